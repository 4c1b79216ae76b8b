#!/usr/bin/env python3
# process_contact_update_params: change what kolokol updates on an existing contact
# (Kommo PATCH /api/v4/contacts).
#
# Input:  {"call_full": {...}, "id": 1234567, "name": "...", "responsible_user_id": ...,
#          "custom_fields_values": [...]}
# Output: the update parameters (without call_full); "id" must stay.
#         Empty data ({}) cancels the update.
#
# This example never reassigns or renames an existing contact: it only keeps the id and
# the phone field, so a manager's edits in the CRM are not overwritten by calls.
#
# Enable:
#   install -m 0755 process_contact_update_params.py /etc/kolokol/customizations/
#   kolokol hook run process_contact_update_params

import json
import sys

KEEP = ("id", "custom_fields_values")


def main():
    params = json.load(sys.stdin)
    update = {k: params[k] for k in KEEP if k in params}
    if list(update) == ["id"]:
        update = {}  # nothing left to update: cancel the request
    print(json.dumps({"state": "success", "data": update}))


if __name__ == "__main__":
    main()
