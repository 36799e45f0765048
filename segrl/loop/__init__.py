"""The active-learning loop: round state machine, selection, LabOR requests, reports."""
