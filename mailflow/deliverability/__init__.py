"""What this host must publish in DNS to be seen as a careful sender, and whether DNS says so (docs/deliverability.md).

    records   `mailflow dns-records DOMAIN`: MX, A, SPF, DKIM per selector, DMARC, MTA-STS (record and policy
              file), TLS-RPT and PTR, derived from the configuration
    spf       an SPF (RFC 7208) evaluation over mailflow's Resolver, for the check
    check     `mailflow check-deliverability [DOMAIN]`: one pass/warn/fail finding per point, with what to change
"""
