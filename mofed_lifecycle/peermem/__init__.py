"""The GPU side's nvidia-peermem loader (`mofed-lifecycle peermem`) and its handshake with the NIC
lifecycle: checks.py (pure decisions), gather.py (read-only reads of the node), loader.py (the
wait/load/watch loop), inotify.py (file events, no dependency), presence.py (the handshake)."""
