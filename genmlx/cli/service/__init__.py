"""``genmlx service``: the master or a node's agent installed as a service of its machine
(``units``: the launchd plist and the systemd unit written; ``managers``: launchctl and systemctl,
behind a runner tests feed recorded output; ``commands``: install, status, logs, uninstall).
It writes and removes only files it wrote, and leaves nothing half installed.
"""
