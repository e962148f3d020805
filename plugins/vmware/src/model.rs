//! Plain Rust types of what the adapter answers, mirroring the contract's `platform` records.
//!
//! They keep the vSphere logic free of the Wasm bindings, so it builds and is tested natively;
//! the Wasm glue (`plugin.rs`) converts them one to one.

use std::fmt;

/// Why an operation failed: the contract's error cases, each with a message for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

/// The contract's error cases this adapter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A setting, an option or an argument is wrong.
    InvalidArgument,
    /// A machine, snapshot, network, datastore … does not exist.
    NotFound,
    /// A machine of that name exists already.
    AlreadyExists,
    /// vCenter or this adapter cannot do it.
    Unsupported,
    /// The host refused (a host not granted).
    Denied,
    /// The connection failed or timed out; retrying may help.
    Io,
    /// vCenter answered with an error.
    Platform,
    /// An answer or a request was too large.
    Limit,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub fn platform(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Platform, message)
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }

    /// The same error with `context: ` in front of its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Power state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Running,
    Stopped,
    Suspended,
    Unknown,
}

impl PowerState {
    /// From vSphere's `VirtualMachinePowerState`.
    pub fn from_vim(s: &str) -> Self {
        match s {
            "poweredOn" => Self::Running,
            "poweredOff" => Self::Stopped,
            "suspended" => Self::Suspended,
            _ => Self::Unknown,
        }
    }
}

/// How a machine is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOffMode {
    /// Ask the guest (VMware Tools) to shut down, and cut the power when it cannot.
    Graceful,
    /// Cut the power.
    Hard,
}

/// A disk of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The device key.
    pub id: String,
    /// The device label (`Hard disk 1`).
    pub name: String,
    /// Capacity in bytes.
    pub size: u64,
    pub sector_size: u32,
    /// The backing file's datastore path (`[ds1] vm/vm.vmdk`).
    pub location: String,
}

/// A network adapter of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The device key.
    pub id: String,
    /// The network's name (a standard network or a distributed port group).
    pub network: String,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Addresses VMware Tools reports on it.
    pub addresses: Vec<String>,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The managed object reference (`vm-42`).
    pub id: String,
    pub name: String,
    /// The BIOS UUID (`config.uuid`).
    pub uuid: String,
    pub power: PowerState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub properties: Vec<(String, String)>,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot's managed object reference (`snapshot-7`).
    pub id: String,
    /// Per disk key, the disk's change id at the snapshot (when changed block tracking is on).
    pub change_ids: Vec<(String, String)>,
}

/// One disk of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDisk {
    pub source_disk: String,
    /// The datastore path of the existing VMDK (`[ds1] haven/vm-1/disk-0.vmdk`).
    pub location: String,
    pub format: String,
    pub size: u64,
}

/// One network adapter of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaNic {
    pub source_nic: String,
    /// The target network's name.
    pub network: String,
    pub static_address: Option<String>,
}

/// What to define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub name: String,
    pub source_machine: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<ReplicaDisk>,
    pub nics: Vec<ReplicaNic>,
    pub options: Vec<(String, String)>,
}

/// What was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMachine {
    pub id: String,
    pub definition: String,
}
