"""Rows GeRe replays: the sources it reads, the general replay set, earlier-task rows, the schedule."""
