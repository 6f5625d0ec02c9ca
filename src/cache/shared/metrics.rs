//! Metrics of the shared tier: object-store operations by result, corrupt objects, bytes moved,
//! lease waits and lease renewals. Labels are bounded: `op` is one of [`Op`], `result` one of
//! [`Res`], [`WaitEnd`] or [`Renewal`].

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, DEFAULT_BUCKETS,
};

/// An object-store operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    GetBlob,
    /// A ranged GET for a client's Range request.
    GetRange,
    PutBlob,
    HeadBlob,
    GetManifest,
    PutManifest,
    /// Reads of link objects (a GET: they hold grant and time).
    HeadLink,
    PutLink,
    /// Whether a blob or manifest was fetched from an upstream (by any replica).
    HeadOrigin,
    PutOrigin,
    /// Reading (or creating) the grant key replicas share.
    GrantKey,
    GetTag,
    /// Writes and deletes of tag objects.
    PutTag,
    Lease,
}

impl Op {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Op::GetBlob => "get_blob",
            Op::GetRange => "get_range",
            Op::PutBlob => "put_blob",
            Op::HeadBlob => "head_blob",
            Op::GetManifest => "get_manifest",
            Op::PutManifest => "put_manifest",
            Op::HeadLink => "head_link",
            Op::PutLink => "put_link",
            Op::HeadOrigin => "head_origin",
            Op::PutOrigin => "put_origin",
            Op::GrantKey => "grant_key",
            Op::GetTag => "get_tag",
            Op::PutTag => "put_tag",
            Op::Lease => "lease",
        }
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Res {
    Ok,
    /// Not found.
    Miss,
    /// A conditional create found the object there already (success for content-addressed
    /// keys).
    Exists,
    /// Transport or server error (the tier then rests for a while).
    Error,
    /// Not tried: the tier is resting after an error.
    Skipped,
}

impl Res {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Res::Ok => "ok",
            Res::Miss => "miss",
            Res::Exists => "exists",
            Res::Error => "error",
            Res::Skipped => "skipped",
        }
    }
}

/// How a wait for another replica's lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WaitEnd {
    /// The blob appeared in the store.
    Landed,
    /// The lease went away without the blob (the other fill failed).
    Released,
    /// The lease expired first; this replica goes upstream itself.
    Expired,
    /// The store failed while waiting.
    Error,
    /// `lease_wait` passed with the lease still live; this replica goes upstream itself.
    TimedOut,
}

impl WaitEnd {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            WaitEnd::Landed => "landed",
            WaitEnd::Released => "released",
            WaitEnd::Expired => "expired",
            WaitEnd::Error => "error",
            WaitEnd::TimedOut => "timed_out",
        }
    }
}

/// How a renewal of a held lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Renewal {
    /// The expiry was pushed out.
    Ok,
    /// The lease was gone or named another owner: renewal stopped.
    Lost,
    /// The store failed; tried again next period.
    Error,
}

impl Renewal {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Renewal::Ok => "ok",
            Renewal::Lost => "lost",
            Renewal::Error => "error",
        }
    }
}

#[derive(Clone)]
pub(super) struct SharedMetrics {
    ops: IntCounterVec,
    corrupt: IntCounter,
    read_bytes: IntCounter,
    uploaded_bytes: IntCounter,
    lease_waits: IntCounterVec,
    lease_wait_seconds: Histogram,
    lease_renewals: IntCounterVec,
}

impl SharedMetrics {
    pub(super) fn register(registry: &Registry) -> prometheus::Result<SharedMetrics> {
        let ops = IntCounterVec::new(
            Opts::new(
                "oci_proxy_cache_shared_ops_total",
                "Shared object-store operations by op and result.",
            ),
            &["op", "result"],
        )?;
        registry.register(Box::new(ops.clone()))?;
        let corrupt = IntCounter::new(
            "oci_proxy_cache_shared_corrupt_total",
            "Objects in the shared store whose bytes did not match their digest (never served).",
        )?;
        registry.register(Box::new(corrupt.clone()))?;
        let read_bytes = IntCounter::new(
            "oci_proxy_cache_shared_read_bytes_total",
            "Verified blob bytes filled from the shared store.",
        )?;
        registry.register(Box::new(read_bytes.clone()))?;
        let uploaded_bytes = IntCounter::new(
            "oci_proxy_cache_shared_uploaded_bytes_total",
            "Blob bytes uploaded to the shared store.",
        )?;
        registry.register(Box::new(uploaded_bytes.clone()))?;
        let lease_waits = IntCounterVec::new(
            Opts::new(
                "oci_proxy_cache_lease_waits_total",
                "Waits for another replica's fill lease, by how they ended.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lease_waits.clone()))?;
        let lease_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "oci_proxy_cache_lease_wait_seconds",
                "Time spent waiting for another replica's fill lease.",
            )
            .buckets(DEFAULT_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(lease_wait_seconds.clone()))?;
        let lease_renewals = IntCounterVec::new(
            Opts::new(
                "oci_proxy_cache_lease_renewals_total",
                "Renewals of fill leases this replica holds, by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lease_renewals.clone()))?;
        Ok(SharedMetrics {
            ops,
            corrupt,
            read_bytes,
            uploaded_bytes,
            lease_waits,
            lease_wait_seconds,
            lease_renewals,
        })
    }

    pub(super) fn op(&self, op: Op, res: Res) {
        self.ops
            .with_label_values(&[op.as_str(), res.as_str()])
            .inc();
    }

    pub(super) fn corrupt(&self) {
        self.corrupt.inc();
    }

    pub(super) fn read(&self, bytes: u64) {
        self.read_bytes.inc_by(bytes);
    }

    pub(super) fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    pub(super) fn lease_wait(&self, end: WaitEnd, seconds: f64) {
        self.lease_waits.with_label_values(&[end.as_str()]).inc();
        self.lease_wait_seconds.observe(seconds);
    }

    pub(super) fn lease_renewal(&self, res: Renewal) {
        self.lease_renewals.with_label_values(&[res.as_str()]).inc();
    }

    #[cfg(test)]
    pub(super) fn op_count(&self, op: Op, res: Res) -> u64 {
        self.ops
            .with_label_values(&[op.as_str(), res.as_str()])
            .get()
    }

    #[cfg(test)]
    pub(super) fn lease_wait_count(&self, end: WaitEnd) -> u64 {
        self.lease_waits.with_label_values(&[end.as_str()]).get()
    }

    #[cfg(test)]
    pub(super) fn lease_renewal_count(&self, res: Renewal) -> u64 {
        self.lease_renewals.with_label_values(&[res.as_str()]).get()
    }

    #[cfg(test)]
    pub(super) fn corrupt_count(&self) -> u64 {
        self.corrupt.get()
    }
}
