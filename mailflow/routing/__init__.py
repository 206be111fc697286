"""Routing libraries: trivial-rewrite's address classes and transport lookup (`rewrite`), cleanup's canonical
and virtual alias rewriting (`addressmap`), and the `Router` that walks an address through all of it for
`mailflow address` and the routing tests (`router`). Pure: no I/O but table lookups, no running components
(those are in mailflow/stages/)."""
