#!/usr/bin/env python3
# process_call_params: change the call registration parameters (Kommo POST /api/v4/calls).
#
# Runs before each call is registered in the CRM.
# Input:  {"call_full": {...}, "call_result": "", "call_status": 4, "created_at": ...,
#          "created_by": ..., "direction": "inbound", "duration": 80, "link": "...",
#          "phone": "+79161234567", "responsible_user_id": ..., "source": "kolokol"}
# Output: the same parameters (without call_full), changed as you like.
#         Empty data ({}) cancels the registration of this call.
#
# This example marks very short answered calls so managers can filter them, and never
# attaches a recording link to calls shorter than that.
#
# Enable:
#   install -m 0755 process_call_params.py /etc/kolokol/customizations/process_call_params.py
#   kolokol hook run process_call_params

import json
import sys

SHORT_CALL_SECONDS = 10
TALKED = 4  # Kommo call_status 4: "talked"


def main():
    params = json.load(sys.stdin)
    params.pop("call_full", None)  # context only: never sent to the CRM
    if params.get("call_status") == TALKED and int(params.get("duration") or 0) < SHORT_CALL_SECONDS:
        params["call_result"] = "Short call (under %d s)" % SHORT_CALL_SECONDS
        params.pop("link", None)
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
