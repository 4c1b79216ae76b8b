#!/usr/bin/env python3
# process_contact_creation_params: change the contact kolokol creates for a new number
# (Kommo POST /api/v4/contacts).
#
# Input:  {"call_full": {...}, "custom_fields_values": [...], "name": "Contact +7...",
#          "responsible_user_id": 5012345, "tags": ["kolokol"]}
# Output: the contact parameters (without call_full); any Kommo contact field may be set.
#         Empty data ({}) cancels creating the contact.
#
# This example tags the contact with the line the client called and names it
# "Client <phone>" instead of "Contact <phone>".
#
# Enable:
#   install -m 0755 process_contact_creation_params.py /etc/kolokol/customizations/
#   kolokol hook run process_contact_creation_params

import json
import sys

# Line (DID) -> tag; calls on other lines get only DEFAULT_TAG.
LINE_TAGS = {"74951234567": "Moscow office"}
DEFAULT_TAG = "Asterisk"


def main():
    params = json.load(sys.stdin)
    call = params.pop("call_full", None) or {}
    tags = list(params.get("tags") or [])
    for tag in (DEFAULT_TAG, LINE_TAGS.get(call.get("line_number"))):
        if tag and tag not in tags:
            tags.append(tag)
    params["tags"] = tags
    name = params.get("name") or ""
    if name.startswith("Contact "):
        params["name"] = "Client " + name[len("Contact "):]
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
