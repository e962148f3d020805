//! Haven's VMware vCenter adapter: a `haven:plugin@0.2.0` `adapter` component speaking the
//! vSphere Web Services API (SOAP, `urn:vim25`, API 6.5) to one vCenter.
//!
//! # Settings
//!
//! | setting      | required | meaning |
//! |--------------|----------|---------|
//! | `url`        | yes      | the SDK URL, `https://vcenter.example.com/sdk` |
//! | `user`       | yes      | the vCenter user (`haven@vsphere.local`) |
//! | `password`   | yes      | its password (never logged) |
//! | `datacenter` | no       | the datacenter to work in, by name; default the first. When set, `inventory` lists only its machines. |
//!
//! Other settings are refused. The instance must be granted the vCenter's host (`http_hosts`).
//!
//! # What it does
//!
//! - `check`: logs in; answers e.g. `VMware vCenter Server 6.5.0 build-5973321 (API 6.5,
//!   instance …) at http://127.0.0.1:8989/sdk as user; datacenter DC0`.
//! - `inventory`: every virtual machine but templates, with id = managed object id (`vm-42`),
//!   uuid = BIOS UUID (`config.uuid`), disks, network adapters and the properties `guest-id`,
//!   `guest-name`, `host`, `folder` (`/DC0/vm/team`), `vm-path`, `tools` (see [`inventory`]).
//! - `power-off` (graceful: `ShutdownGuest` when VMware Tools run, else a hard power-off),
//!   `power-on`, `create-snapshot` / `delete-snapshot` (snapshot id = its managed object id;
//!   change ids when changed block tracking is on).
//! - `define-replica`: `CreateVM_Task` attaching the existing VMDKs; options `folder`,
//!   `resource-pool`, `host`, `datastore`, `guest-id`, `nic-type`, `scsi-controller`; static
//!   addresses go to `extraConfig` `guestinfo.haven.nic<N>.address` (see [`replica`]).
//! - `delete-machine`: only machines `define-replica` made (they carry `extraConfig`
//!   `guestinfo.haven.source-machine`): powers off, detaches the disks keeping their files,
//!   destroys the machine. One that does not exist is not an error.
//! - `quiesce`, `changed-extents`, `read-snapshot`: `unsupported`. vCenter's changed block
//!   tracking (`QueryChangedDiskAreas`) and disk reads (VDDK/NFC) are not spoken; Haven captures
//!   VMware machines with its agent. `thaw` succeeds.
//!
//! # Layout
//!
//! The vSphere logic does no I/O of its own and builds natively, so it is tested without Wasm:
//! [`xml`] (escaping, answer trees), [`soap`] (messages and faults), [`inventory`] and
//! [`replica`] (pure translations), [`client`] (session and operations over a
//! [`client::Transport`]). Only `plugin.rs`, compiled for `wasm32`, touches the contract: it
//! reads the settings, sends requests through `haven_plugin_sdk::http`, keeps one session per
//! instance and converts types.

pub mod client;
pub mod inventory;
pub mod model;
pub mod replica;
pub mod soap;
pub mod xml;

#[cfg(target_arch = "wasm32")]
mod plugin;

/// The first `max` characters of `body` as text on one line, with `…` when cut.
pub(crate) fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}
