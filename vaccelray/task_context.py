"""What the task running in this process is bound to.

A pool process sets it around each task; ``vaccelray.local`` reads it, so a
task submitted in a :class:`vaccelray.Session` uses that session on the
worker. A leaf module: the pool process and the task's side share it
without importing each other.
"""

from __future__ import annotations

#: The running task's vAccel session id on the worker (0: none).
session_id = 0
