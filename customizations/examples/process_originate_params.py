#!/usr/bin/env python3
# process_originate_params: change a click-to-call before kolokol asks Asterisk to
# originate it (AMI Originate).
#
# Input:  {"params": {"caller_id": "...", "channel": "PJSIP/101", "context": "from-internal",
#          "extension": "+7 (916) 123-45-67", "priority": "1", "request_data": {...}}}
# Output: {"state": "success", "data": {"caller_id": ..., "channel": ..., "context": ...,
#          "extension": ..., "priority": ...}}  (request_data is read-only)
#         Empty data ({}) cancels the call.
#
# This example dials Russian numbers as 8 + 10 digits through the usual context, and
# sends international numbers through another context (another trunk) with the 810
# prefix. Numbers on a deny list are never dialled.
#
# Enable:
#   install -m 0755 process_originate_params.py /etc/kolokol/customizations/
#   kolokol hook run process_originate_params

import json
import sys

INTERNATIONAL_CONTEXT = "from-internal-intl"
NEVER_DIAL = {"88005553535"}


def main():
    request = json.load(sys.stdin)
    params = dict(request.get("params") or {})
    params.pop("request_data", None)
    digits = "".join(ch for ch in str(params.get("extension") or "") if ch.isdigit())
    if len(digits) == 11 and digits[0] in "78":
        number = "8" + digits[1:]
    elif len(digits) == 10:
        number = "8" + digits
    elif len(digits) > 11:
        number = "810" + digits
        params["context"] = INTERNATIONAL_CONTEXT
    else:
        number = digits  # internal numbers and short codes as they are
    if number in NEVER_DIAL:
        print(json.dumps({"state": "success", "data": {}}))  # cancel
        return
    params["extension"] = number
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
