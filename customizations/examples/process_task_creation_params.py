#!/usr/bin/env python3
# process_task_creation_params: change the task created for a missed call
# (Kommo POST /api/v4/tasks). Runs only when task creation is enabled.
#
# Input:  {"call_full": {...}, "complete_till": 1700003600, "created_by": 0,
#          "entity_id": ..., "entity_type": "contacts", "is_completed": false,
#          "responsible_user_id": ..., "task_type": 1, "text": "Call back ..."}
# Output: the task parameters (without call_full). Empty data ({}) cancels the task.
#
# This example writes a shorter text with the time of the call and sets the deadline
# to 30 minutes from now in working hours, or to 10:00 on the next working day.
#
# Enable:
#   install -m 0755 process_task_creation_params.py /etc/kolokol/customizations/
#   kolokol hook run process_task_creation_params

import datetime
import json
import sys

WORK_START_HOUR = 10
WORK_END_HOUR = 19
REACTION = datetime.timedelta(minutes=30)


def deadline(now):
    due = now + REACTION
    if due.weekday() < 5 and WORK_START_HOUR <= due.hour < WORK_END_HOUR:
        return due
    day = now.date() + datetime.timedelta(days=1 if now.hour >= WORK_START_HOUR else 0)
    while day.weekday() >= 5:  # Saturday, Sunday
        day += datetime.timedelta(days=1)
    return datetime.datetime(day.year, day.month, day.day, WORK_START_HOUR, tzinfo=now.tzinfo)


def main():
    params = json.load(sys.stdin)
    call = params.pop("call_full", None) or {}
    now = datetime.datetime.now().astimezone()
    phone = call.get("client_phone") or "unknown number"
    params["text"] = "Missed call from %s at %s: call back" % (phone, now.strftime("%H:%M"))
    params["complete_till"] = int(deadline(now).timestamp())
    print(json.dumps({"state": "success", "data": params}))


if __name__ == "__main__":
    main()
