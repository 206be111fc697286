"""local(8): delivery to this host's users. `agent` is the transport (aliases, .forward, Maildir or mbox,
forwarding, commands, files); `aliasing` expands alias_maps and .forward into those targets, as Postfix's
src/local/alias.c and dotforward.c; `mbox` writes the mbox format under the locks Dovecot also takes."""
from mailflow.transports.local.agent import LocalTransport

__all__ = ["LocalTransport"]
