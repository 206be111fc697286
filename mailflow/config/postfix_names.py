"""Postfix main.cf parameter names -> mailflow settings: the one table `mailflow config import` translates by.

It holds what docs/config.md's tables say ("mailflow | default | Postfix counterpart"); a test
(tests/unit/test_postfix_names.py) checks that every Postfix name those tables cite is here, so the two cannot drift.

    SETTINGS          Postfix name -> the mailflow setting(s) it sets ("key" or "section.key"); the value is
                      converted by the setting's type (bool, int, duration, list, string)
    BUILT_IN          Postfix name -> (the value that is mailflow's fixed behaviour, why): that value needs no
                      setting; any other value is left out with the reason
    NOT_NEEDED        Postfix name -> why it has no meaning for mailflow (Postfix's own files, daemons, programs)
    NOT_IMPORTABLE    Postfix name -> why it cannot be translated (a behaviour mailflow lacks, or a setting
                      mailflow spreads differently); why_not(name): that, or "no counterpart"
    CONVERTED         Postfix name -> how the importer translates it itself (a value that is not one setting's)
    per_transport(name) -> (transport, setting) | None   `<transport>_destination_recipient_limit` and
                      `<transport>_destination_rate_delay`: a key of queue.transport_destination_*
    DURATION_UNITS    Postfix name -> the unit of a bare number (Postfix's per-parameter default unit; else "s")
    MERGED_DEFAULTS   Postfix name -> its default, for names several of which set one mailflow setting
                      (smtp_mail_timeout, smtp_rcpt_timeout… -> smtp.command_timeout): written only when all agree
    RAW               the names Postfix reads without $name expansion (its CONFIG_RAW_TABLEs): their $names are
                      expanded when used (local(8)'s $user, smtpd's $client_address, the shell's $SENDER)

A leaf: data only.
"""
from __future__ import annotations


def _same(section: str, names: str, prefix: str = "") -> dict[str, str]:
    """{prefix+name: section.name} for names spelt the same in both (without section: top-level settings)."""
    return {prefix + name: f"{section}.{name}" if section else name for name in names.split()}


SETTINGS: dict[str, tuple[str, ...]] = {name: (key,) for name, key in {
    **_same("", "myhostname myorigin mydomain append_dot_mydomain mydestination proxy_interfaces allow_percent_hack "
                "swap_bangpath relay_domains mynetworks relayhost local_transport relay_transport default_transport "
                "transport_maps "
                "sender_dependent_relayhost_maps sender_dependent_default_transport_maps "
                "empty_address_relayhost_maps_lookup_key empty_address_default_transport_maps_lookup_key "
                "relocated_maps relay_recipient_maps recipient_delimiter allow_min_user hopcount_limit "
                "message_drop_headers header_size_limit smtputf8_autodetect_classes local_header_rewrite_clients "
                "remote_header_rewrite_domain "
                "always_add_missing_headers local_recipient_maps alias_maps canonical_maps sender_canonical_maps "
                "recipient_canonical_maps masquerade_domains masquerade_exceptions always_bcc sender_bcc_maps "
                "recipient_bcc_maps virtual_alias_domains virtual_alias_maps virtual_alias_recursion_limit "
                "virtual_alias_expansion_limit virtual_mailbox_domains virtual_mailbox_maps virtual_mailbox_base "
                "virtual_transport virtual_mailbox_limit virtual_mailbox_limit_maps virtual_overquota_bounce "
                "virtual_uid_maps virtual_gid_maps soft_bounce"),
    **_same("local", "allow_mail_to_commands allow_mail_to_files default_privs command_time_limit home_mailbox "
                     "mail_spool_directory mailbox_delivery_lock mailbox_size_limit mailbox_transport mailbox_command "
                     "fallback_transport luser_relay"),
    **_same("smtpd", "peername_lookup recipient_limit recipient_overshoot_limit timeout tls_cert_file tls_key_file "
                     "tls_security_level starttls_timeout tls_loglevel tls_ask_ccert tls_fingerprint_digest "
                     "sasl_auth_enable sasl_type sasl_path sasl_authenticated_header sasl_exceptions_networks "
                     "sender_login_maps client_connection_count_limit client_connection_rate_limit "
                     "client_message_rate_limit client_recipient_rate_limit client_auth_rate_limit "
                     "client_new_tls_session_rate_limit restriction_classes delay_reject client_restrictions "
                     "helo_restrictions sender_restrictions relay_restrictions recipient_restrictions "
                     "data_restrictions end_of_data_restrictions etrn_restrictions reject_unlisted_recipient "
                     "reject_unlisted_sender policy_service_timeout policy_service_default_action "
                     "policy_service_policy_context policy_service_max_idle policy_service_max_ttl "
                     "policy_service_request_limit forbid_unauth_pipelining min_data_rate soft_error_limit "
                     "hard_error_limit error_sleep_time junk_command_limit reject_footer discard_ehlo_keywords "
                     "discard_ehlo_keyword_address_maps helo_required upstream_proxy_protocol "
                     "upstream_proxy_timeout authorized_xclient_hosts milters null_access_lookup_key", prefix="smtpd_"),
    **_same("smtpd", "relay_clientcerts anvil_rate_time_unit plaintext_reject_code multi_recipient_bounce_reject_code "
                     "unknown_address_reject_code unknown_address_tempfail_action unknown_hostname_reject_code "
                     "unknown_helo_hostname_tempfail_action unknown_client_reject_code "
                     "permit_mx_backup_networks unknown_local_recipient_reject_code unknown_virtual_alias_reject_code "
                     "unknown_virtual_mailbox_reject_code unknown_relay_recipient_reject_code "
                     "unverified_recipient_reject_code unverified_recipient_defer_code "
                     "unverified_recipient_tempfail_action unverified_recipient_reject_reason "
                     "unverified_sender_reject_code unverified_sender_defer_code unverified_sender_tempfail_action "
                     "unverified_sender_reject_reason disable_vrfy_command strict_rfc821_envelopes content_filter "
                     "receive_override_options message_size_limit default_rbl_reply rbl_reply_maps maps_rbl_domains "
                     "maps_rbl_reject_code access_map_reject_code access_map_defer_code reject_code defer_code "
                     "relay_domains_reject_code invalid_hostname_reject_code non_fqdn_reject_code"),
    "smtpd_banner": "smtpd.banner",
    "smtpd_tls_CAfile": "smtpd.tls_ca_file",
    "smtpd_log_access_permit_actions": "smtpd.log_access_permit_actions",
    "line_length_limit": "smtpd.max_line_length",
    "inet_interfaces": "smtpd.listen",
    **_same("checks", "header_checks mime_header_checks nested_header_checks body_checks body_checks_size_limit"),
    **_same("milter", "default_action protocol connect_timeout command_timeout content_timeout", prefix="milter_"),
    "non_smtpd_milters": "milter.non_smtpd_milters",
    **_same("address_verify", "sender sender_ttl relayhost transport_maps local_transport virtual_transport "
                              "relay_transport default_transport sender_dependent_relayhost_maps "
                              "sender_dependent_default_transport_maps poll_count poll_delay positive_expire_time "
                              "positive_refresh_time negative_cache negative_expire_time negative_refresh_time",
            prefix="address_verify_"),
    **_same("smtp", "connect_timeout helo_timeout starttls_timeout helo_name tls_security_level tls_policy_maps "
                    "tls_cert_file tls_key_file tls_loglevel sasl_password_maps generic_maps "
                    "sender_dependent_authentication connection_cache_time_limit connection_reuse_count_limit "
                    "connection_reuse_time_limit bind_address bind_address6 bind_address_enforce fallback_relay",
            prefix="smtp_"),
    "smtp_tls_CAfile": "smtp.tls_ca_file",
    "smtp_data_done_timeout": "smtp.data_timeout",
    **{f"smtp_{n}_timeout": "smtp.command_timeout" for n in ("mail", "rcpt", "data_init", "rset")},
    **_same("lmtp", "connect_timeout bind_address bind_address6 bind_address_enforce connection_cache_time_limit "
                    "connection_reuse_count_limit connection_reuse_time_limit", prefix="lmtp_"),
    **_same("smtp", "header_checks mime_header_checks nested_header_checks body_checks reply_filter", prefix="smtp_"),
    **_same("lmtp", "header_checks mime_header_checks nested_header_checks body_checks generic_maps", prefix="lmtp_"),
    "smtpd_command_filter": "smtpd.command_filter",
    "smtpd_forbid_bare_newline": "smtpd.forbid_bare_newline",  # its words: postfix_cf.convert
    "smtpd_forbid_bare_newline_exclusions": "smtpd.forbid_bare_newline_exclusions",
    **{f"lmtp_{n}_timeout": "lmtp.command_timeout" for n in ("lhlo", "mail", "rcpt", "data_init")},
    **{f"lmtp_{n}_timeout": "lmtp.data_timeout" for n in ("data_xfer", "data_done")},
    **_same("queue", "queue_run_delay minimal_backoff_time maximal_backoff_time maximal_queue_lifetime "
                     "bounce_queue_lifetime delay_warning_time bounce_size_limit initial_destination_concurrency "
                     "default_destination_concurrency_limit queue_minfree"),
    "2bounce_notice_recipient": "queue.double_bounce_recipient",
    **_same("queue", "notify_classes bounce_notice_recipient delay_notice_recipient error_notice_recipient "
                     "bounce_template_file"),
    "qmgr_message_active_limit": "queue.active_limit",
    "default_destination_concurrency_failed_cohort_limit": "queue.destination_concurrency_failed_cohort_limit",
    "default_destination_rate_delay": "queue.destination_rate_delay",
    "default_destination_recipient_limit": "queue.destination_recipient_limit",
    "syslog_name": "log.syslog_name",
    "maillog_file": "log.file",
    **_same("sendmail", "authorized_submit_users local_login_sender_maps"),
    **_same("smtpd.postscreen", "access_list denylist_action greet_wait greet_action greet_ttl dnsbl_sites "
                                "dnsbl_threshold dnsbl_allowlist_threshold dnsbl_action dnsbl_timeout dnsbl_min_ttl "
                                "dnsbl_max_ttl pre_queue_limit client_connection_count_limit command_count_limit "
                                "command_time_limit pipelining_enable pipelining_action pipelining_ttl "
                                "non_smtp_command_enable non_smtp_command_action non_smtp_command_ttl "
                                "bare_newline_enable bare_newline_action bare_newline_ttl dnsbl_reply_map "
                                "allowlist_interfaces tls_security_level discard_ehlo_keywords "
                                "discard_ehlo_keyword_address_maps command_filter reject_footer reject_footer_maps "
                                "expansion_filter",
           prefix="postscreen_"),
    "postscreen_whitelist_interfaces": "smtpd.postscreen.allowlist_interfaces",  # its name before Postfix 3.6
    "postscreen_blacklist_action": "smtpd.postscreen.denylist_action",  # its name before Postfix 3.6
    "postscreen_dnsbl_whitelist_threshold": "smtpd.postscreen.dnsbl_allowlist_threshold",
    "postscreen_dnsbl_ttl": "smtpd.postscreen.dnsbl_max_ttl",  # its name before Postfix 3.1
}.items()}
SETTINGS["default_process_limit"] = ("smtpd.max_sessions", "queue.delivery_concurrency_limit")

# the tempfail actions whose Postfix default is $reject_tempfail_action (CONVERTED: set from it unless given)
REJECT_TEMPFAIL_ACTIONS = ("unknown_helo_hostname_tempfail_action", "unknown_address_tempfail_action",
                           "unverified_recipient_tempfail_action", "unverified_sender_tempfail_action")
_DEEP_TESTS = ("pipelining", "non_smtp_command", "bare_newline")  # postscreen's tests after the handshake
# smtpd's and postscreen's forbidden commands: Postfix name -> mailflow setting (CONVERTED: a list of words)
FORBIDDEN_COMMANDS = {"smtpd_forbidden_commands": "smtpd.forbid_cmds",
                      "postscreen_forbidden_commands": "smtpd.postscreen.forbidden_commands"}
BUILT_IN: dict[str, tuple[str, str]] = {
    "smtpd_tls_auth_only": ("yes", "mailflow offers AUTH only after TLS (smtpd.allow_plaintext_auth_on_loopback "
                                   "is the one exception)"),
    "tls_append_default_CA": ("no", "smtp.tls_ca_file is used alone, as with tls_append_default_CA = no"),
    "biff": ("no", "mailflow never notifies comsat"),
    "smtputf8_enable": ("yes", "mailflow speaks SMTPUTF8"),
    "disable_dns_lookups": ("no", "mailflow always uses the DNS (a [host] next hop, as a content filter's "
                                  "[127.0.0.1]:10024, is never looked up as MX)"),
    "smtp_tls_note_starttls_offer": ("no", "mailflow does not log it"),
    "cleanup_replace_stray_cr_lf": ("yes", "mailflow stores a stray <CR> in message content as a space (those "
                                           "before a <LF> dropped), as Postfix 3.7.10+ by default: smtpd's from "
                                           "the clients whose bare <LF> is taken, and sendmail's"),
    "smtpd_forbid_bare_newline_reject_code": ("521", "mailflow refuses a bare <LF> with 521 5.5.2 and disconnects, "
                                                     "after a command as in DATA"),
    **dict.fromkeys(("smtp_connection_cache_on_demand", "lmtp_connection_cache_on_demand"), (
        "yes", "mailflow's SMTP and LMTP clients cache every session (Postfix's: on demand, for a destination with "
               "a backlog) for connection_cache_time_limit (0s turns a client's cache off)")),
}
# main.cf's *_connection_cache_on_demand -> its client (= no, without *_connection_cache_destinations: no cache)
CACHE_ON_DEMAND = {"smtp_connection_cache_on_demand": "smtp", "lmtp_connection_cache_on_demand": "lmtp"}

_POSTFIX_OWN = "a path or setting of Postfix's own installation; mailflow keeps its own (queue_directory)"
NOT_NEEDED: dict[str, str] = {
    **dict.fromkeys(("queue_directory", "command_directory", "daemon_directory", "data_directory",
                     "meta_directory", "shlib_directory", "manpage_directory", "sample_directory", "html_directory",
                     "readme_directory", "config_directory", "mail_owner", "setgid_group", "sendmail_path",
                     "newaliases_path", "mailq_path", "alias_database", "maillog_file_prefixes", "mail_name",
                     "process_id_directory"), _POSTFIX_OWN),
    "compatibility_level": "mailflow's defaults are its own (docs/config.md states each and Postfix's)",
    "debugger_command": "Postfix's own daemons' debugging (postfix -D); mailflow's logs: log.level",
    **dict.fromkeys(("proxy_read_maps", "proxy_write_maps"),
                    "mailflow has no proxymap(8): it opens a proxy: table itself (the prefix dropped)"),
    "inet_protocols": "applied with inet_interfaces: the smtpd.listen addresses",
    **dict.fromkeys(("smtpd_tls_session_cache_database", "smtp_tls_session_cache_database",
                     "smtpd_tls_session_cache_timeout", "smtp_tls_session_cache_timeout", "tls_random_source",
                     "smtpd_tls_received_header"), "TLS session caching and logging are built in"),
    "milter_macro_daemon_name": "mailflow sends the milter macros it has itself",
    "max_use": "mailflow's delivery agents and listeners are no processes: none is restarted after so many uses",
    "smtpd_sasl_local_domain": "mailflow's SASL names are the logins as given",
    "smtpd_sasl_security_options": "mailflow offers PLAIN and LOGIN over TLS, never anonymously",
    "smtpd_sasl_tls_security_options": "mailflow offers PLAIN and LOGIN over TLS, never anonymously",
    "qmgr_message_recipient_limit": "mailflow's qmgr takes all of a message's recipients at once, not in "
                                    "chunks (docs/config.md, destination_recipient_limit)",
}

NOT_IMPORTABLE: dict[str, str] = {
    **dict.fromkeys(("smtp_connection_cache_destinations", "lmtp_connection_cache_destinations"),
                    "mailflow's clients cache every destination's sessions or none (connection_cache_time_limit), "
                    "not a list of destinations'"),
    "smtpd_reject_footer_maps": "mailflow's smtpd has reject_footer (one text, its macros), not a map by reply",
    "smtpd_expansion_filter": "mailflow's smtpd filters its footer macros with Postfix's default (a tab and "
                              "printable ASCII), not a setting",
    "postscreen_cache_map": "mailflow's postscreen keeps its cache of passed clients in memory (cache_limit)",
    **dict.fromkeys(("smtpd_tls_protocols", "smtpd_tls_mandatory_protocols", "smtpd_tls_ciphers",
                     "smtpd_tls_mandatory_ciphers", "smtpd_tls_exclude_ciphers", "smtp_tls_protocols",
                     "smtp_tls_mandatory_protocols", "smtp_tls_ciphers", "smtp_tls_mandatory_ciphers",
                     "smtp_tls_exclude_ciphers", "smtpd_tls_dh1024_param_file", "smtpd_tls_eecdh_grade",
                     "tls_preempt_cipherlist", "tls_ssl_options"),
                    "mailflow takes the protocol versions and ciphers of Python's ssl defaults (TLS 1.2 and up)"),
    "smtp_tls_CApath": "mailflow reads one CA file (smtp.tls_ca_file), not a directory",
    "smtpd_tls_CApath": "mailflow reads one CA file (smtpd.tls_ca_file), not a directory",
    "smtpd_tls_wrappermode": "a listener property: give it in master.cf (-o smtpd_tls_wrappermode=yes)",
    "mailbox_command_maps": "mailflow has local.mailbox_command only",
    "smtpd_tls_ccert_verifydepth": "mailflow's chain depth is fixed (10 intermediate CAs, docs/config.md)",
}

CONVERTED: dict[str, str] = {
    "smtpd_tls_chain_files": "smtpd.tls_cert_file and smtpd.tls_key_file: one key and its certificate chain (Postfix "
                             "then ignores smtpd_tls_cert_file and smtpd_tls_key_file)",
    "smtpd_banner": "smtpd.banner: what follows $myhostname",
    "inet_interfaces": "smtpd.listen: each address with master.cf's smtp port (inet_protocols decides all's)",
    "smtp_sasl_security_options": "smtp.sasl_tls_required: true when it holds noplaintext",
    **dict.fromkeys(("smtpd_use_tls", "smtpd_enforce_tls"),
                    "smtpd.tls_security_level (encrypt, may or none, as Postfix 3.7 maps smtpd_enforce_tls and "
                    "smtpd_use_tls), unless smtpd_tls_security_level says"),
    **dict.fromkeys(("postscreen_use_tls", "postscreen_enforce_tls"),
                    "smtpd.postscreen.tls_security_level (encrypt, may or none, as Postfix 3.7 maps them), unless a "
                    "postscreen_ or smtpd_tls_security_level says"),
    **dict.fromkeys(("smtp_use_tls", "smtp_enforce_tls", "smtp_tls_enforce_peername"),
                    "smtp.tls_security_level (verify, encrypt, may or none, as Postfix 3.7 maps smtp_enforce_tls, "
                    "smtp_tls_enforce_peername and smtp_use_tls), unless smtp_tls_security_level says"),
    "smtpd_restriction_classes": "smtpd.restriction_classes: each class with its parameter's restrictions",
    "smtpd_sasl_path": "smtpd.sasl_path under smtpd_sasl_type = dovecot (a relative path from queue_directory, as "
                       "Postfix takes it); under cyrus, Postfix's default type, left out",
    "smtp_sasl_password_maps": "smtp.sasl_password_maps when smtp_sasl_auth_enable = yes (Postfix ignores it else)",
    "postscreen_greet_banner": "smtpd.postscreen.greet_banner: $smtpd_banner is smtpd's own greeting (the default)",
    "smtp_sasl_auth_enable": "applied with smtp_sasl_password_maps (mailflow authenticates when it has a password)",
    "reject_tempfail_action": "each of smtpd.unknown_helo_hostname_tempfail_action, unknown_address_tempfail_action, "
                              "unverified_recipient_tempfail_action and unverified_sender_tempfail_action that "
                              "main.cf does not set (Postfix's defaults are $reject_tempfail_action); a master.cf "
                              "-o sets them for that listener",
    **dict.fromkeys(FORBIDDEN_COMMANDS, "its words; its default's regexp:{{/^[^A-Z]/ Bogus}} is built in (a command "
                                        "that does not begin with a letter is never SMTP)"),
}

_PER_TRANSPORT = {"destination_recipient_limit": "queue.transport_destination_recipient_limit",
                  "destination_rate_delay": "queue.transport_destination_rate_delay"}


def per_transport(name: str) -> tuple[str, str] | None:
    """(transport, mailflow setting) for a per-transport Postfix parameter, else None."""
    for suffix, setting in _PER_TRANSPORT.items():
        transport = name.removesuffix("_" + suffix)
        if transport != name and transport and transport != "default":
            return transport, setting
    return None
_UNKNOWN = "no mailflow counterpart (not in docs/config.md's tables)"


def why_not(name: str) -> str:
    """Why `name` is not imported: its NOT_IMPORTABLE reason, else that mailflow has no counterpart."""
    return NOT_IMPORTABLE.get(name, _UNKNOWN)


DURATION_UNITS: dict[str, str] = {
    "maximal_queue_lifetime": "d", "bounce_queue_lifetime": "d", "delay_warning_time": "h",
    "address_verify_positive_expire_time": "d", "address_verify_positive_refresh_time": "d",
    "address_verify_negative_expire_time": "d", "address_verify_negative_refresh_time": "h",
    "address_verify_sender_ttl": "s", "smtpd_policy_service_max_idle": "s",
    "postscreen_greet_ttl": "d", "postscreen_dnsbl_max_ttl": "h",
    "postscreen_dnsbl_ttl": "h",
    **{f"postscreen_{test}_ttl": "d" for test in _DEEP_TESTS},
}

RAW = frozenset(("mailbox_command", "luser_relay", "forward_path", "exec_directory", "smtpd_reject_footer",
                 "postscreen_reject_footer", "default_rbl_reply", "smtpd_expansion_filter",
                 "postscreen_expansion_filter"))

MERGED_DEFAULTS = {  # postconf -d of Postfix 3.7.11
    **{f"{client}_{command}_timeout": default for client in ("smtp", "lmtp")
       for command, default in (("mail", "300s"), ("rcpt", "300s"), ("data_init", "120s"), ("rset", "20s"),
                                ("lhlo", "300s"), ("data_xfer", "180s"), ("data_done", "600s"))},
}
