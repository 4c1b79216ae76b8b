#!/usr/bin/env python3
# need_registration: black list of lines/trunks, white list of extensions.
#
# Runs at every stage of a call (conversation_requested, conversation_accepted,
# conversation_ended, call_ended) before anything is sent to the CRM.
# Input:  {"call_full": {...}, "call_stage": "conversation_requested"}
# Output: {"state": "success", "data": {"result": true}}   register the call
#         {"state": "success", "data": {"result": false}}  ignore it at this stage
#
# Enable (this file is only an example until copied):
#   install -m 0755 need_registration.py /etc/kolokol/customizations/need_registration.py
#   kolokol hook run need_registration          # try it with a sample call
# Disable: delete it from /etc/kolokol/customizations (or rename it, e.g. *.py.off).

import json
import sys

# Calls on these lines (the DID the client dialled / the office line used) or trunks
# are never registered, e.g. a fax line or a test trunk.
BLACKLISTED_LINES = {"74950000000"}
BLACKLISTED_TRUNKS = {"test-trunk"}

# When not empty, only calls answered by these extensions are registered (calls nobody
# answered yet are still registered so missed calls are not lost).
EXTENSION_WHITELIST = set()  # e.g. {"101", "102", "103"}


def main():
    request = json.load(sys.stdin)
    call = request.get("call_full") or {}
    register = True
    if call.get("line_number") in BLACKLISTED_LINES:
        register = False
    if call.get("trunk") in BLACKLISTED_TRUNKS:
        register = False
    answered_by = call.get("answered_by") or ""
    if EXTENSION_WHITELIST and answered_by and answered_by not in EXTENSION_WHITELIST:
        register = False
    print(json.dumps({"state": "success", "data": {"result": register}}))


if __name__ == "__main__":
    main()
