#!/usr/bin/env python3
# process_lead_creation_params: change the lead kolokol creates (Kommo POST /api/v4/leads).
#
# Input:  {"call_full": {...}, "_embedded": {"contacts": [{"id": ...}], "tags": [{"name": "kolokol"}]},
#          "name": "+79161234567 - incoming", "pipeline_id": ..., "responsible_user_id": ...,
#          "status_id": ...}
# Output: the lead parameters (without call_full); any Kommo lead field may be set.
#         Empty data ({}) cancels creating the lead.
#
# This example adds a tag for missed calls and puts leads from one line into another
# pipeline.
#
# Enable:
#   install -m 0755 process_lead_creation_params.py /etc/kolokol/customizations/
#   kolokol hook run process_lead_creation_params

import json
import sys

MISSED_TAG = "Missed call"
# Line (DID) -> pipeline id; other lines keep kolokol's pipeline.
LINE_PIPELINES = {"74957654321": 8000001}


def main():
    params = json.load(sys.stdin)
    call = params.pop("call_full", None) or {}
    embedded = params.setdefault("_embedded", {})
    tags = embedded.setdefault("tags", [])
    if int(call.get("result") or 0) != 200 and not any(t.get("name") == MISSED_TAG for t in tags):
        tags.append({"name": MISSED_TAG})
    pipeline = LINE_PIPELINES.get(call.get("line_number"))
    if pipeline:
        params["pipeline_id"] = pipeline
        params.pop("status_id", None)  # the first status of that pipeline
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
