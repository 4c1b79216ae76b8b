#!/usr/bin/env python3
# process_client_phone: change the client's number before it is sent to the CRM.
#
# Runs at each stage, after kolokol's own normalisation.
# Input:  {"phone": "89161234567", "call_full": {...}, "call_stage": "..."}
# Output: {"state": "success", "data": {"phone": "+79161234567"}}
#         Empty data ({}) cancels what would be sent for this number.
#
# This example turns Russian numbers written as 8XXXXXXXXXX, 7XXXXXXXXXX or a bare
# 10-digit XXXXXXXXXX into the international +7XXXXXXXXXX; other numbers are left alone.
#
# Enable:
#   install -m 0755 process_client_phone.py /etc/kolokol/customizations/process_client_phone.py
#   kolokol hook run process_client_phone

import json
import sys


def international(phone):
    digits = "".join(ch for ch in phone if ch.isdigit())
    if len(digits) == 11 and digits[0] in "78":
        return "+7" + digits[1:]
    if len(digits) == 10 and digits[0] == "9":
        return "+7" + digits
    return phone


def main():
    request = json.load(sys.stdin)
    phone = str(request.get("phone") or "")
    print(json.dumps({"state": "success", "data": {"phone": international(phone)}}))


if __name__ == "__main__":
    main()
