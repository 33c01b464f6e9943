//! Many providers of one service: registries, load balancing and failover.
