"""The stages a message passes through: smtpd -> cleanup -> (store) -> qmgr -> transports."""
