"""`ditserve keys`: make the secrets an operator hands out, and the config entries that admit them.

`keys create NAME` makes a tenant's API key and its webhook signing secret, shows both once
(on stderr, to pass to the tenant) and prints the `auth.keys` entry (on stdout, for the
config): the key's SHA-256, and the signing secret itself, since signing needs it.
`keys webhook-secret` makes one secret (for `webhooks.secret`, or to rotate a key's).
"""

from __future__ import annotations

import argparse
import re
import sys

EXIT_USAGE = 2  # as the rest of the CLI: a usage mistake


def add_keys_commands(sub) -> None:
    """The `keys` subcommands, under `ditserve`'s subparsers `sub`."""
    keys = sub.add_parser("keys", help="make an API key (with its webhook signing secret) or a webhook secret")
    keys_sub = keys.add_subparsers(dest="keys", required=True, parser_class=type(keys))
    create = keys_sub.add_parser("create", help="a new API key and webhook signing secret, and the auth.keys entry "
                                                "that admits them")
    create.add_argument("name", help="the tenant this key acts for (letters, digits, _ . -)")
    keys_sub.add_parser("webhook-secret", help="a new webhook signing secret (whsec_...) for webhooks.secret, or to "
                                               "replace a key's webhook_secret")


def run_keys(args: argparse.Namespace) -> int:
    import yaml

    from serving.webhooks import new_secret

    if args.keys == "webhook-secret":
        print(yaml.safe_dump({"webhooks": {"secret": new_secret()}}, sort_keys=False), end="")
        return 0
    from serving.auth import key_digest, new_key

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.name):
        print(f"ditserve keys create: error: NAME must be 1-64 letters, digits, '_', '.' or '-', found {args.name!r}",
              file=sys.stderr)
        return EXIT_USAGE
    key, webhook_secret = new_key(), new_secret()
    print(f"# For {args.name!r}, give both to the client (the API key is shown only now):\n"
          f"#   API key:                {key}\n"
          f"#   webhook signing secret: {webhook_secret}  (verifies the webhooks of this key's videos)",
          file=sys.stderr)
    print("# Add this entry to auth.keys in the config (the key is kept only as its hash):", file=sys.stderr)
    entry = {"name": args.name, "sha256": key_digest(key), "webhook_secret": webhook_secret}
    print(yaml.safe_dump({"auth": {"enabled": True, "keys": [entry]}}, sort_keys=False), end="")
    return 0
