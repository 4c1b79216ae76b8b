#!/usr/bin/env python3
# process_record_file_path: tell kolokol where the recording of a call really is.
#
# Runs once per recorded conversation, before the link is sent to the CRM.
# Timeout: 10 s by default (this hook may convert audio); change it with
#   [customizations.timeouts] process_record_file_path = "30s"
# Input:  {"call_full": {...}, "path": "/var/spool/asterisk/monitor/.../x.wav"}
# Output: {"state": "success", "data": {"path": "/path/to/the/file"}}
#         Empty data or any failure: the path from Asterisk is used as is.
#
# This example looks for the file where a nightly job moves recordings (a mounted
# storage), and prefers an .mp3 made next to the .wav (e.g. by MixMonitor's post
# command) so no conversion is needed.
#
# Enable:
#   install -m 0755 process_record_file_path.py /etc/kolokol/customizations/
#   kolokol hook run process_record_file_path

import json
import os
import sys

# Where recordings may have been moved: (prefix Asterisk wrote, prefix now).
MOVED = [("/var/spool/asterisk/monitor/", "/mnt/records/")]


def candidates(path):
    paths = [path]
    for old, new in MOVED:
        if path.startswith(old):
            paths.append(new + path[len(old):])
    for p in list(paths):
        base, ext = os.path.splitext(p)
        if ext.lower() == ".wav":
            paths.insert(0, base + ".mp3")
    return paths


def main():
    request = json.load(sys.stdin)
    path = str(request.get("path") or "")
    found = next((p for p in candidates(path) if os.path.isfile(p)), None)
    if found is None:
        # Tell kolokol to keep its own path; the reason shows in its log.
        print(json.dumps({"state": "success", "data": {}}))
        return
    print(json.dumps({"state": "success", "data": {"path": found}}))


if __name__ == "__main__":
    main()
