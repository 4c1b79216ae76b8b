#!/usr/bin/env python3
# process_lead_update_params: change what kolokol updates on an existing lead
# (Kommo PATCH /api/v4/leads).
#
# Input:  {"call_full": {...}, "id": 7777777, "name": "...", "pipeline_id": ...,
#          "status_id": 142, "responsible_user_id": ...}
# Output: the update parameters (without call_full); "id" must stay.
#         Empty data ({}) cancels the update.
#
# This example leaves closed leads alone (Kommo status 142 "won", 143 "lost") and never
# moves a lead to another pipeline or status because of a call.
#
# Enable:
#   install -m 0755 process_lead_update_params.py /etc/kolokol/customizations/
#   kolokol hook run process_lead_update_params

import json
import sys

CLOSED_STATUSES = {142, 143}


def main():
    params = json.load(sys.stdin)
    params.pop("call_full", None)
    if params.get("status_id") in CLOSED_STATUSES:
        print(json.dumps({"state": "success", "data": {}}))  # cancel
        return
    params.pop("pipeline_id", None)
    params.pop("status_id", None)
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
