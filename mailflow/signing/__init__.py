"""What makes this host's outbound mail authenticated (docs/deliverability.md): DKIM signing, ARC sealing, SRS.

    keytables   OpenDKIM's SigningTable and KeyTable; SigningKey; keys_from_config
    dkim        the DKIM-Signature of a queued message: body hash streamed, header set signed by dkimpy
    arc         ARC sealing of a forwarded message (dkimpy), with this host's Authentication-Results
    keygen      new keys and their TXT records (`mailflow dkim keygen`)
    outbound    OutboundSigning: which message gets what, as cleanup queues it (SRS, ARC, DKIM)
The SRS codec itself is routing's (mailflow.routing.srs): cleanup's address mapping undoes it for bounces.
"""
