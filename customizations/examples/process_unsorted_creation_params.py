#!/usr/bin/env python3
# process_unsorted_creation_params: change the "unsorted" item kolokol creates for a
# call from an unknown number (Kommo POST /api/v4/leads/unsorted/sip).
#
# Input:  {"call_full": {...}, "source_uid": "...", "source_name": "kolokol",
#          "pipeline_id": ..., "created_at": ..., "metadata": {...},
#          "_embedded": {"leads": [{...}], "contacts": [{...}]}}
# Output: the unsorted parameters (without call_full); the lead and contact fields in
#         _embedded may be changed. Empty data ({}) cancels the request.
#
# This example names the source after the line the client called, so managers see
# which advert brought the call, and puts it into the lead's name too.
#
# Enable:
#   install -m 0755 process_unsorted_creation_params.py /etc/kolokol/customizations/
#   kolokol hook run process_unsorted_creation_params

import json
import sys

# Line (DID) -> advertising source.
LINE_SOURCES = {"74951234567": "Website", "74957654321": "Radio ad"}


def main():
    params = json.load(sys.stdin)
    call = params.pop("call_full", None) or {}
    source = LINE_SOURCES.get(call.get("line_number"))
    if source:
        params["source_name"] = source
        for lead in (params.get("_embedded") or {}).get("leads") or []:
            lead["name"] = "%s (%s)" % (lead.get("name") or "Call", source)
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
