"""SR-IOV: snapshot before the reload, wait for VF netdevs by udev events, restore every VF."""
