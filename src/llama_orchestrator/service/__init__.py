"""Running the daemon as a service: systemd (system or user), NSSM, Task Scheduler."""
