//! This gateway as a member of a deployment (`[join]`): what it reports to its configuration
//! server, how it runs its assignment, and how it answers the calls forwarded to it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use haven_engine::join::JoinHandler;
use haven_engine::master_target::MasterTarget;
use haven_engine::process_server::ProcessServer;
use haven_net::join::{ApiAnswer, ApiRequest, Assignment, Health, ProcessServerContact, Report};

/// The gateway's side of its membership.
pub struct Joined {
    name: String,
    site: String,
    data_dir: PathBuf,
    api: haven_api::Api,
    routes: haven_api::deployment::LocalRoutes,
    ps: Option<Arc<ProcessServer>>,
    mt: Option<Arc<MasterTarget>>,
    /// How agents reach this gateway's process server.
    contact: Option<ProcessServerContact>,
    /// The configuration server's CRL as kept with the assignment.
    crl_seen: Mutex<Option<String>>,
    /// CPU seconds used and when, at the last report.
    cpu: Mutex<Option<(f64, Instant)>>,
}

impl Joined {
    pub fn new(
        data_dir: &Path,
        site: &str,
        api: haven_api::Api,
        ps: Option<Arc<ProcessServer>>,
        mt: Option<Arc<MasterTarget>>,
        contact: Option<ProcessServerContact>,
    ) -> Result<Joined> {
        let name_file = data_dir.join("join/name");
        let name = std::fs::read_to_string(&name_file)
            .with_context(|| {
                format!(
                    "reading {}; enroll with the configuration server first \
                     (`haven-gateway enroll --config-server`)",
                    name_file.display()
                )
            })?
            .trim()
            .to_string();
        let routes = haven_api::local_routes(api.clone())?;
        Ok(Joined {
            name,
            site: site.to_string(),
            data_dir: data_dir.to_path_buf(),
            api,
            routes,
            ps,
            mt,
            contact,
            crl_seen: Mutex::new(kept_assignment(data_dir)?.and_then(|a| a.crl_pem)),
            cpu: Mutex::new(None),
        })
    }

    fn health(&self) -> Health {
        let mut health = Health::default();
        if let Some(used) = cpu_seconds() {
            let now = Instant::now();
            let mut last = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((before, at)) = *last {
                let elapsed = now.duration_since(at).as_secs_f64();
                if elapsed > 0.0 {
                    health.cpu_percent = (used - before) / elapsed * 100.0;
                }
            }
            *last = Some((used, now));
        }
        health.memory_bytes = resident_bytes().unwrap_or(0);
        if let Ok(fs) = rustix::fs::statvfs(&self.data_dir) {
            health.free_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
            health.total_bytes = fs.f_blocks.saturating_mul(fs.f_frsize);
        }
        health
    }
}

impl JoinHandler for Joined {
    fn report(&self) -> Report {
        let mut roles = Vec::new();
        if self.ps.is_some() {
            roles.push("process-server".to_string());
        }
        if self.mt.is_some() {
            roles.push("master-target".to_string());
        }
        // Not what this gateway knows as a configuration server itself: the report would
        // carry its own previous reports, nested deeper every second.
        let status = serde_json::to_value(haven_engine::status::GatewayStatus {
            config_server: None,
            ..(self.api.status)()
        })
        .unwrap_or_default();
        Report {
            name: self.name.clone(),
            site: self.site.clone(),
            roles,
            status,
            health: self.health(),
            assignment_revision: 0,
            process_server: self.contact.clone(),
        }
    }

    fn crl(&self, crl_pem: Option<&str>) {
        let Some(ps) = &self.ps else { return };
        let crl_pem = crl_pem.map(str::to_string);
        if let Err(e) = ps.listener().set_config_server_crl(crl_pem.clone()) {
            tracing::error!(error = %format!("{e:#}"), "loading the configuration server's CRL");
            return;
        }
        // Kept with the assignment, so a restart serves the agents at once (the listener
        // answers an unchanged CRL without work; the file is written when it changed).
        let mut seen = self.crl_seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == crl_pem {
            return;
        }
        let kept = kept_assignment(&self.data_dir).and_then(|kept| {
            let mut a = kept.unwrap_or_default();
            a.crl_pem.clone_from(&crl_pem);
            Ok(haven_fsutil::write_atomic(
                &assignment_path(&self.data_dir),
                &serde_json::to_vec_pretty(&a)?,
                0o644,
            )?)
        });
        match kept {
            Ok(()) => *seen = crl_pem,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "keeping the configuration server's CRL")
            }
        }
    }

    fn apply(&self, assignment: &Assignment) {
        tracing::info!(
            revision = assignment.revision,
            machines = assignment.machines.len(),
            "running the configuration server's assignment"
        );
        // Kept, so that a restart runs it from the start, the configuration server reachable
        // or not.
        let kept = serde_json::to_vec_pretty(assignment)
            .map_err(anyhow::Error::from)
            .and_then(|json| {
                Ok(haven_fsutil::write_atomic(
                    &assignment_path(&self.data_dir),
                    &json,
                    0o644,
                )?)
            });
        if let Err(e) = kept {
            tracing::error!(error = %format!("{e:#}"), "keeping the assignment");
        }
        if let Some(ps) = &self.ps {
            ps.set_policies(assignment.machines.clone());
        }
        if let Some(mt) = &self.mt {
            mt.set_retention(retention_of(assignment));
        }
    }

    fn call(&self, request: ApiRequest) -> Pin<Box<dyn Future<Output = ApiAnswer> + Send>> {
        Box::pin(self.routes.call(request))
    }
}

/// Where a joined gateway keeps its last assignment.
fn assignment_path(data_dir: &Path) -> PathBuf {
    data_dir.join("join/assignment.json")
}

/// The assignment this gateway ran last, if it is joined and has one.
pub fn kept_assignment(data_dir: &Path) -> Result<Option<Assignment>> {
    let path = assignment_path(data_dir);
    match std::fs::read(&path) {
        Ok(json) => Ok(Some(serde_json::from_slice(&json).with_context(|| {
            format!(
                "{} is damaged; remove it (the configuration server sends the assignment again)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The retention each machine of `assignment` is kept by.
pub fn retention_of(
    assignment: &Assignment,
) -> std::collections::HashMap<String, haven_engine::retention::RetentionPolicy> {
    let mut retention = std::collections::HashMap::new();
    for (machine, policy) in &assignment.machines {
        match serde_json::from_value(policy.retention.clone()) {
            Ok(r) => {
                retention.insert(machine.clone(), r);
            }
            Err(e) => tracing::error!(%machine, policy = %policy.policy, error = %e,
                "the assigned retention does not parse; this gateway's own applies"),
        }
    }
    retention
}

/// CPU time this process used, seconds (`/proc/self/stat`: utime and stime).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Resident memory of this process, bytes (`/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
