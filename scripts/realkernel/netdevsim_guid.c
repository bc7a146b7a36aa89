/* Test-only addition to netdevsim for the real-kernel lane (scripts/realkernel-lane inserts it
 * into a copy of the kernel's drivers/net/netdevsim/netdev.c at build time): VF IB GUIDs, so that
 * IFLA_VF_IB_NODE_GUID / IFLA_VF_IB_PORT_GUID reach a driver as they reach mlx5 on an IB PF.
 * rtnetlink hands GUIDs only to a netdev of type ARPHRD_INFINIBAND, which the lane's build sets
 * on the PF netdev. One table for the module: the lane makes one device at a time. */
#define MLT_MAX_VFS 64
static u64 mlt_node_guid[MLT_MAX_VFS], mlt_port_guid[MLT_MAX_VFS];

static int mlt_set_vf_guid(struct net_device *dev, int vf, u64 guid, int guid_type)
{
	struct netdevsim *ns = netdev_priv(dev);

	if (vf < 0 || vf >= nsim_dev_get_vfs(ns->nsim_dev) || vf >= MLT_MAX_VFS)
		return -EINVAL;
	if (guid_type == IFLA_VF_IB_NODE_GUID)
		mlt_node_guid[vf] = guid;
	else if (guid_type == IFLA_VF_IB_PORT_GUID)
		mlt_port_guid[vf] = guid;
	else
		return -EINVAL;
	return 0;
}

static int mlt_get_vf_guid(struct net_device *dev, int vf, struct ifla_vf_guid *node_guid,
			   struct ifla_vf_guid *port_guid)
{
	struct netdevsim *ns = netdev_priv(dev);

	if (vf < 0 || vf >= nsim_dev_get_vfs(ns->nsim_dev) || vf >= MLT_MAX_VFS)
		return -EINVAL;
	node_guid->guid = mlt_node_guid[vf];
	port_guid->guid = mlt_port_guid[vf];
	return 0;
}

