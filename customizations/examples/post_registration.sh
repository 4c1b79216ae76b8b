#!/bin/sh
# post_registration: do something after a call stage has been registered in the CRM.
#
# Input:  {"call_full": {...}, "call_stage": "call_ended", "crm": "kommo",
#          "result": {<what the CRM answered: ids of the call, entity, ...>}}
# Output: {"state": "success", "data": {}}  (the data is not used)
#
# This example (POSIX sh, no JSON parsing needed) appends every input as one line to a
# JSON Lines journal, e.g. for a BI tool. Keep such scripts quick: the run is bounded
# by the hook's timeout (3 s by default) and the shared pool of script slots.
#
# Enable:
#   install -m 0755 post_registration.sh /etc/kolokol/customizations/post_registration.sh
#   install -d -o kolokol /var/log/kolokol     # the journal's folder, writable by kolokol
#   kolokol hook run post_registration

JOURNAL=/var/log/kolokol/post_registration.jsonl

set -eu
# Read the whole input first (kolokol closes stdin after writing it), then append it in
# one write so concurrent runs never interleave lines.
input=$(cat)
printf '%s\n' "$input" >> "$JOURNAL"
printf '{"state":"success","data":{}}\n'
