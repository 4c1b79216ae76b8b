#!/usr/bin/env python3
# autodistribution: choose who gets an incoming call (the extension Asterisk dials and
# the name shown on the employee's phone).
#
# Runs when Asterisk asks kolokol where to send an incoming call.
# Input:  {"number": "101", "name": "Anna Smirnova", "from": "89161234567",
#          "trunk": "sip-provider", "request_data": {...}, "entity": {...}, "error": "..."}
#         from, trunk, entity and error are present only when not empty.
# Output: {"state": "success", "data": {"number": "101", "name": "Anna Smirnova"}}
#         from, trunk, request_data, entity and error are read-only: kolokol drops them
#         from the output. name longer than 20 characters is cut (Asterisk CallerID).
#         Empty data or any failure: the responsible user found in the CRM.
#
# This example sends VIP clients to the senior manager and shows "VIP" before the name.
#
# Enable:
#   install -m 0755 autodistribution.py /etc/kolokol/customizations/
#   kolokol hook run autodistribution

import json
import sys

VIP_NUMBERS = {"79161234567", "79031112233"}  # last 11 digits
SENIOR_MANAGER = "100"


def main():
    request = json.load(sys.stdin)
    digits = "".join(ch for ch in str(request.get("from") or "") if ch.isdigit())
    if len(digits) == 11 and digits[0] == "8":
        digits = "7" + digits[1:]
    result = {"number": request.get("number", ""), "name": request.get("name", "")}
    if digits in VIP_NUMBERS:
        entity_name = (request.get("entity") or {}).get("name") or "client"
        result = {"number": SENIOR_MANAGER, "name": ("VIP " + entity_name)[:20]}
    print(json.dumps({"state": "success", "data": result}))


if __name__ == "__main__":
    main()
