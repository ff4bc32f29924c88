"""What the workflow writes for people to read: reports and their plots."""
