"""Launchers of real processes: every one that the service, its tests and
its benchmarks start.

- `redis`: an embedded redis-server (the one-command local run, the tests,
  the benchmarks);
- `cluster`: a local Redis Cluster, 3 masters with one replica each;
- `sentinel`: a local Sentinel group, a master, its replica, 3 sentinels;
- `haproxy`: HAProxy in TCP mode in front of several front workers;
- `docker`: a Docker daemon, the base image and the project's image;
- `prometheus`: a Prometheus server;
- `process`: what they share (free ports, waiting until a process answers,
  `LaunchError`, stopping a child).

Each launcher stops what it started, and only that: by PID, the child it
started itself, never by a process name.
"""
