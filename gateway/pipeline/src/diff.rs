//! What applying one pipeline over another changes, resource by resource.
//!
//! A resource is known by its kind and name: a renamed machine is one removed and one added.
//! Fields are compared in the pipeline's serialized form, so a change's path is the file's
//! (`retention.window`, `target.subnet`, `step[1].machines`); a list of values is one field, a
//! list of tables is compared table by table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::decode::key_segment;
use crate::model::*;

/// A kind of resource. Changes are listed in this order, which is also an order to create
/// them in: every kind refers only to kinds before it (remove in the reverse order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// `[deployment]`.
    Deployment,
    /// `[[site]]`.
    Site,
    /// `[[gateway]]`.
    Gateway,
    /// `[[plugin]]`.
    Plugin,
    /// `[[policy]]`.
    Policy,
    /// `[[network_mapping]]`.
    NetworkMapping,
    /// `[[cache_account]]`.
    CacheAccount,
    /// `[[machine]]`.
    Machine,
    /// `[[group]]`.
    Group,
    /// `[[plan]]`.
    Plan,
    /// `[[webhook]]`.
    Webhook,
}

impl ResourceKind {
    /// The name in the file.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "deployment",
            ResourceKind::Site => "site",
            ResourceKind::Gateway => "gateway",
            ResourceKind::Plugin => "plugin",
            ResourceKind::Policy => "policy",
            ResourceKind::NetworkMapping => "network_mapping",
            ResourceKind::CacheAccount => "cache_account",
            ResourceKind::Machine => "machine",
            ResourceKind::Group => "group",
            ResourceKind::Plan => "plan",
            ResourceKind::Webhook => "webhook",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// It is created.
    Add,
    /// These fields change.
    Change(Vec<FieldChange>),
    /// It is removed.
    Remove,
}

/// One field that changes, its values rendered short (a long value ends in `…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldChange {
    /// The field's path in the resource, e.g. `retention.window`.
    pub path: String,
    /// The current value; none when the field is not set now.
    pub old: Option<String>,
    /// The desired value; none when the field is left out.
    pub new: Option<String>,
}

impl fmt::Display for FieldChange {
    /// `path old → new`, `(none)` for an absent value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        write!(f, "{} {} → {}", self.path, show(&self.old), show(&self.new))
    }
}

/// A change to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The resource's kind.
    pub kind: ResourceKind,
    /// The resource's name.
    pub name: String,
    /// What happens to it.
    pub action: Action,
    /// What applying it destroys, if anything: the caller refuses it unless told to allow
    /// destruction.
    pub destroys: Option<String>,
}

impl fmt::Display for Change {
    /// `+ machine web01`, `~ policy gold: crash_consistent_interval 5s → 10s`, `- group app`,
    /// followed by `  (destroys: …)` for a destructive change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            Action::Add => write!(f, "+ {} {}", self.kind, self.name)?,
            Action::Remove => write!(f, "- {} {}", self.kind, self.name)?,
            Action::Change(fields) => {
                write!(f, "~ {} {}: ", self.kind, self.name)?;
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{field}")?;
                }
            }
        }
        if let Some(what) = &self.destroys {
            write!(f, "  (destroys: {what})")?;
        }
        Ok(())
    }
}

/// Every change from one pipeline to another, ordered by kind ([`ResourceKind`]) then name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The changes.
    pub changes: Vec<Change>,
}

impl Plan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes that destroy something (a removed machine's journal and replica…).
    pub fn destructive(&self) -> Vec<&Change> {
        self.changes
            .iter()
            .filter(|c| c.destroys.is_some())
            .collect()
    }

    /// How many resources are added, changed and removed.
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |f: fn(&Action) -> bool| self.changes.iter().filter(|c| f(&c.action)).count();
        (
            count(|a| matches!(a, Action::Add)),
            count(|a| matches!(a, Action::Change(_))),
            count(|a| matches!(a, Action::Remove)),
        )
    }
}

impl fmt::Display for Plan {
    /// One change per line, then a summary line (`No changes.` when empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "No changes.");
        }
        for change in &self.changes {
            writeln!(f, "{change}")?;
        }
        let (add, change, remove) = self.counts();
        write!(
            f,
            "Plan: {add} to add, {change} to change, {remove} to remove"
        )?;
        match self.destructive().len() {
            0 => writeln!(f, "."),
            n => writeln!(f, "; {n} destructive."),
        }
    }
}

/// The changes that turn `current` into `desired`.
pub fn diff(current: &Pipeline, desired: &Pipeline) -> Plan {
    let mut changes = Vec::new();
    let fields = field_changes(&current.deployment, &desired.deployment);
    if !fields.is_empty() {
        changes.push(Change {
            kind: ResourceKind::Deployment,
            name: desired.deployment.name.clone(),
            action: Action::Change(fields),
            destroys: None,
        });
    }
    let name = |s: &str| s.to_string();
    compare(
        &mut changes,
        ResourceKind::Site,
        &current.sites,
        &desired.sites,
        |s| name(&s.name),
        |_, _| None,
    );
    compare(
        &mut changes,
        ResourceKind::Gateway,
        &current.gateways,
        &desired.gateways,
        |g| name(&g.name),
        gateway_destroys,
    );
    compare(
        &mut changes,
        ResourceKind::Plugin,
        &current.plugins,
        &desired.plugins,
        |p| name(&p.name),
        |_, _| None,
    );
    compare(
        &mut changes,
        ResourceKind::Policy,
        &current.policies,
        &desired.policies,
        |p| name(p.name()),
        policy_destroys,
    );
    compare(
        &mut changes,
        ResourceKind::NetworkMapping,
        &current.network_mappings,
        &desired.network_mappings,
        |m| name(&m.name),
        |_, _| None,
    );
    compare(
        &mut changes,
        ResourceKind::CacheAccount,
        &current.cache_accounts,
        &desired.cache_accounts,
        |c| name(&c.name),
        |_, _| None,
    );
    compare(
        &mut changes,
        ResourceKind::Machine,
        &current.machines,
        &desired.machines,
        |m| name(&m.name),
        machine_destroys,
    );
    compare(
        &mut changes,
        ResourceKind::Group,
        &current.groups,
        &desired.groups,
        |g| name(&g.name),
        |_, _| None,
    );
    retention_shrinks(&mut changes, current, desired);
    compare(
        &mut changes,
        ResourceKind::Plan,
        &current.plans,
        &desired.plans,
        |p| name(&p.name),
        |_, _| None,
    );
    compare(
        &mut changes,
        ResourceKind::Webhook,
        &current.webhooks,
        &desired.webhooks,
        |w| name(&w.name),
        |_, _| None,
    );
    Plan { changes }
}

/// Compares one kind's resources by name. `destroys(old, new)` says what a removal (`new` is
/// none) or a change destroys.
fn compare<T: Serialize>(
    out: &mut Vec<Change>,
    kind: ResourceKind,
    current: &[T],
    desired: &[T],
    name: impl Fn(&T) -> String,
    destroys: impl Fn(&T, Option<&T>) -> Option<String>,
) {
    let old: BTreeMap<String, &T> = current.iter().map(|t| (name(t), t)).collect();
    let new: BTreeMap<String, &T> = desired.iter().map(|t| (name(t), t)).collect();
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for n in names {
        let (action, destroys) = match (old.get(n), new.get(n)) {
            (None, Some(_)) => (Action::Add, None),
            (Some(o), None) => (Action::Remove, destroys(o, None)),
            (Some(o), Some(d)) => {
                let fields = field_changes(o, d);
                if fields.is_empty() {
                    continue;
                }
                (Action::Change(fields), destroys(o, Some(d)))
            }
            (None, None) => continue,
        };
        out.push(Change {
            kind,
            name: n.clone(),
            action,
            destroys,
        });
    }
}

/// A machine whose effective retention window shrinks (it moved to another policy, or its
/// group did) loses its older points: that is destructive even when neither the machine nor
/// the policy itself changed in a destructive way.
fn retention_shrinks(changes: &mut Vec<Change>, current: &Pipeline, desired: &Pipeline) {
    let f = haven_engine::retention::format_duration;
    for m in &desired.machines {
        let (Some(was), Some(will)) = (
            current.replication_policy_of(&m.name),
            desired.replication_policy_of(&m.name),
        ) else {
            continue;
        };
        if was.name == will.name || will.retention.window >= was.retention.window {
            continue;
        }
        let what = format!(
            "recovery points of `{}` older than {} (it moves from policy `{}`, {} of points, \
             to `{}`)",
            m.name,
            f(will.retention.window),
            was.name,
            f(was.retention.window),
            will.name
        );
        let at = changes
            .iter()
            .position(|c| c.kind == ResourceKind::Machine && c.name == m.name);
        match at {
            Some(i) => {
                let c = &mut changes[i];
                c.destroys = Some(match c.destroys.take() {
                    Some(d) => format!("{d}; {what}"),
                    None => what,
                });
            }
            None => {
                // In its place among the machines: kinds in order, names in order.
                let at = changes.partition_point(|c| {
                    (c.kind, c.name.as_str()) < (ResourceKind::Machine, m.name.as_str())
                });
                changes.insert(
                    at,
                    Change {
                        kind: ResourceKind::Machine,
                        name: m.name.clone(),
                        action: Action::Change(vec![FieldChange {
                            path: "policy (through its group)".into(),
                            old: Some(was.name.clone()),
                            new: Some(will.name.clone()),
                        }]),
                        destroys: Some(what),
                    },
                );
            }
        }
    }
}

fn gateway_destroys(old: &Gateway, new: Option<&Gateway>) -> Option<String> {
    let was_mt = old.roles.contains(&Role::MasterTarget);
    let stays_mt = new.is_some_and(|g| g.roles.contains(&Role::MasterTarget));
    (was_mt && !stays_mt).then(|| {
        format!(
            "the journals and replicas kept at master target `{}`",
            old.name
        )
    })
}

fn policy_destroys(old: &Policy, new: Option<&Policy>) -> Option<String> {
    let (Policy::Replication(old), Some(Policy::Replication(new))) = (old, new) else {
        return None;
    };
    let (was, will) = (old.retention.window, new.retention.window);
    (will < was).then(|| {
        let f = haven_engine::retention::format_duration;
        format!(
            "recovery points older than {} (the retention window shrinks from {})",
            f(will),
            f(was)
        )
    })
}

fn machine_destroys(old: &Machine, new: Option<&Machine>) -> Option<String> {
    let Some(new) = new else {
        return Some(format!(
            "the journal and replica of `{}` at `{}`",
            old.name, old.master_target
        ));
    };
    let mut what = Vec::new();
    if old.site != new.site || old.master_target != new.master_target {
        what.push(format!(
            "the journal and replica at `{}` (the machine replicates anew to `{}`)",
            old.master_target, new.master_target
        ));
    } else if old.writer != new.writer {
        what.push(format!(
            "the replica's recovery points (the replica is written anew by `{}`)",
            new.writer
        ));
    }
    if !new.disks.is_empty() {
        if old.disks.is_empty() {
            what.push("the journals of the disks not listed in `disks`".into());
        } else {
            let dropped: Vec<String> = old
                .disks
                .iter()
                .filter(|d| !new.disks.contains(d))
                .map(|d| format!("`{d}`"))
                .collect();
            if !dropped.is_empty() {
                what.push(format!("the journals of disks {}", dropped.join(", ")));
            }
        }
    }
    (!what.is_empty()).then(|| what.join("; "))
}

/// The fields that differ between two values of one resource.
fn field_changes<T: Serialize>(old: &T, new: &T) -> Vec<FieldChange> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    flatten(&to_json(old), String::new(), &mut a);
    flatten(&to_json(new), String::new(), &mut b);
    let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    paths
        .into_iter()
        .filter(|p| a.get(*p) != b.get(*p))
        .map(|p| FieldChange {
            path: p.clone(),
            old: a.get(p).map(short),
            new: b.get(p).map(short),
        })
        .collect()
}

fn to_json<T: Serialize>(t: &T) -> Value {
    // The model serializes to plain JSON values (no maps with non-string keys).
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Leaves of `v` by path: tables are walked, lists of tables element by element, any other
/// list is one leaf.
fn flatten(v: &Value, path: String, out: &mut BTreeMap<String, Value>) {
    let join = |key: &str| {
        let key = key_segment(key);
        if path.is_empty() {
            key
        } else {
            format!("{path}.{key}")
        }
    };
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                flatten(child, join(k), out);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, child) in items.iter().enumerate() {
                flatten(child, format!("{path}[{i}]"), out);
            }
        }
        _ => {
            out.insert(path, v.clone());
        }
    }
}

/// Longest rendered value before it is cut with `…`.
const SHORT: usize = 48;

fn short(v: &Value) -> String {
    let s = render(v);
    if s.chars().count() <= SHORT {
        return s;
    }
    let mut cut: String = s.chars().take(SHORT - 1).collect();
    cut.push('…');
    cut
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() || s.contains(char::is_whitespace) => format!("{s:?}"),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}
