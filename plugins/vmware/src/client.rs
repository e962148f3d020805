//! A vCenter session and the adapter's operations, over any [`Transport`].
//!
//! The Wasm glue gives it outgoing HTTP through the host; tests give it a scripted vCenter.
//!
//! Session: the first call of an instance fetches the service content and logs in; the
//! `vmware_soap_session` cookie vCenter sets is sent with every later call of the same instance.
//! When vCenter answers `NotAuthenticated` (the session expired, vCenter restarted), the client
//! logs in again once and repeats the call.
//!
//! Tasks are waited for by reading their `info` until it says `success` or `error`, sleeping
//! 25 ms, doubling up to 1 s, in between. Every operation gives up after [`OPERATION_BUDGET`]
//! (the host's deadline for one call is 30 s by default); a task still running then goes on in
//! vCenter, and repeating the call is safe.

use std::time::Duration;

use crate::inventory;
use crate::model::{
    Error, ErrorKind, Machine, PowerOffMode, PowerState, ReplicaMachine, ReplicaSpec, Snapshot,
};
use crate::replica::{self, Options};
use crate::soap::{self, Fault, Moref, ObjectContent, PropSpec, ServiceContent, TaskState};
use crate::xml::{Element, escape};

/// Longest one operation waits for vCenter's tasks.
pub const OPERATION_BUDGET: Duration = Duration::from_secs(25);
/// Longest a graceful power-off waits for the guest to stop.
pub const GRACEFUL_BUDGET: Duration = Duration::from_secs(20);
/// The name of vCenter's session cookie.
const SESSION_COOKIE: &str = "vmware_soap_session";
/// The settings this adapter knows.
pub const SETTINGS: &[&str] = &["url", "user", "password", "datacenter"];

/// An HTTP answer, as much of it as SOAP needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    /// Values of the `set-cookie` headers.
    pub set_cookie: Vec<String>,
    pub body: Vec<u8>,
}

/// How the client reaches vCenter, waits and reports.
pub trait Transport {
    /// POSTs the SOAP request `body` to `url` (with `SOAPAction` [`soap::SOAP_ACTION`]) and, when
    /// given, `cookie` (`name=value`).
    fn post(&mut self, url: &str, cookie: Option<&str>, body: &str) -> Result<HttpAnswer, Error>;
    /// Waits `d`.
    fn sleep(&mut self, d: Duration);
    /// A monotonic clock.
    fn now(&self) -> Duration;
    /// Tells the operator (the host attributes it to the plugin instance).
    fn log(&mut self, _message: &str) {}
}

/// The adapter's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// The SDK URL, `https://vcenter.example/sdk`.
    pub url: String,
    pub user: String,
    pub password: String,
    /// The datacenter to work in (by name); `None`: the first. Inventory lists every
    /// datacenter's machines unless this is set.
    pub datacenter: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .field("datacenter", &self.datacenter)
            .finish()
    }
}

impl Settings {
    /// Checks the values (names were checked by the caller).
    pub fn check(&self) -> Result<(), Error> {
        let url_ok = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .is_some_and(|rest| {
                let authority = rest.split('/').next().unwrap_or_default();
                !authority.is_empty() && !authority.contains('@')
            });
        if !url_ok {
            return Err(Error::invalid(format!(
                "setting `url`: `{}` is not an SDK URL like https://vcenter.example.com/sdk \
                 (credentials go in `user` and `password`)",
                self.url
            )));
        }
        if self.user.is_empty() {
            return Err(Error::invalid("setting `user` is empty"));
        }
        if self.password.is_empty() {
            return Err(Error::invalid("setting `password` is empty"));
        }
        if self.datacenter.as_deref() == Some("") {
            return Err(Error::invalid("setting `datacenter` is empty"));
        }
        Ok(())
    }
}

/// A datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Datacenter {
    moref: Moref,
    name: String,
    vm_folder: Moref,
}

/// One vCenter session.
pub struct Client<T> {
    transport: T,
    settings: Settings,
    content: Option<ServiceContent>,
    /// `vmware_soap_session=…` once logged in.
    cookie: Option<String>,
    /// Who vCenter says we are.
    user_name: String,
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T, settings: Settings) -> Self {
        Self {
            transport,
            settings,
            content: None,
            cookie: None,
            user_name: String::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    // ---------------------------------------------------------------- session and calls

    /// One exchange; keeps a session cookie vCenter sets.
    fn exchange(&mut self, body: &str) -> Result<Result<Element, Fault>, Error> {
        let answer = self
            .transport
            .post(&self.settings.url, self.cookie.as_deref(), body)?;
        for c in &answer.set_cookie {
            if let Some(pair) = c.split(';').next().map(str::trim)
                && pair.starts_with(SESSION_COOKIE)
                && pair[SESSION_COOKIE.len()..].starts_with('=')
            {
                self.cookie = Some(pair.to_owned());
            }
        }
        soap::parse_answer(answer.status, &answer.body)
    }

    /// The service content, fetched once per session.
    fn content(&mut self) -> Result<ServiceContent, Error> {
        if let Some(c) = &self.content {
            return Ok(c.clone());
        }
        let answer = self
            .exchange(&soap::retrieve_service_content())
            .map_err(|e| e.context(format!("vCenter at {}", self.settings.url)))?;
        let response = answer.map_err(|f| {
            fault_error(
                &format!("vCenter at {}: RetrieveServiceContent", self.settings.url),
                &f,
            )
        })?;
        let content = soap::parse_service_content(&response)?;
        self.content = Some(content.clone());
        Ok(content)
    }

    fn login(&mut self) -> Result<(), Error> {
        let content = self.content()?;
        // vCenter refuses a Login on a live session: start from none.
        self.cookie = None;
        let body = soap::login(
            &content.session_manager,
            &self.settings.user,
            &self.settings.password,
        );
        match self.exchange(&body)? {
            Ok(response) => {
                if self.cookie.is_none() {
                    return Err(Error::platform(format!(
                        "vCenter at {} accepted the login but set no {SESSION_COOKIE} cookie",
                        self.settings.url
                    )));
                }
                self.user_name = soap::parse_login(&response);
                Ok(())
            }
            Err(f) if f.kind == "InvalidLogin" => Err(Error::invalid(format!(
                "vCenter at {} refused the login of user `{}` (InvalidLogin): check the settings \
                 `user` and `password`",
                self.settings.url, self.settings.user
            ))),
            Err(f) => Err(fault_error(
                &format!("vCenter at {}: Login", self.settings.url),
                &f,
            )),
        }
    }

    /// Calls with a session: logs in first when there is none, and once more when vCenter
    /// says the session is gone. `build` makes the request from the service content.
    fn invoke(
        &mut self,
        build: impl Fn(&ServiceContent) -> String,
    ) -> Result<Result<Element, Fault>, Error> {
        if self.cookie.is_none() {
            self.login()?;
        }
        let content = self.content()?;
        let body = build(&content);
        let session_gone = |answer: &Result<Element, Fault>| match answer {
            Err(f) => f.kind == "NotAuthenticated",
            Ok(response) => soap::lacks_session(response),
        };
        match self.exchange(&body)? {
            answer if session_gone(&answer) => {
                self.transport
                    .log("vCenter session expired; logging in again");
                self.login()?;
                self.exchange(&body)
            }
            other => Ok(other),
        }
    }

    /// [`Self::invoke`], with a fault as an error saying `what` was done.
    fn call(
        &mut self,
        what: &str,
        build: impl Fn(&ServiceContent) -> String,
    ) -> Result<Element, Error> {
        self.invoke(build)?.map_err(|f| fault_error(what, &f))
    }

    /// Starts a task and waits for it; `Ok(Err(fault))` when the task (or starting it) failed.
    fn run_task(
        &mut self,
        what: &str,
        deadline: Duration,
        build: impl Fn(&ServiceContent) -> String,
    ) -> Result<Result<Option<Element>, Fault>, Error> {
        let response = match self.invoke(build)? {
            Ok(r) => r,
            Err(f) => return Ok(Err(f)),
        };
        let task = soap::parse_returned_moref(what, &response)?;
        self.wait(what, &task, deadline)
    }

    fn wait(
        &mut self,
        what: &str,
        task: &Moref,
        deadline: Duration,
    ) -> Result<Result<Option<Element>, Fault>, Error> {
        let mut pause = Duration::from_millis(25);
        loop {
            let objects = self.retrieve_objects(
                &format!("{what}: reading task {}", task.value),
                std::slice::from_ref(task),
                &[PropSpec {
                    kind: "Task",
                    paths: &["info"],
                }],
            )?;
            let info = objects
                .first()
                .and_then(|o| o.prop("info"))
                .ok_or_else(|| {
                    Error::platform(format!("{what}: task {} has no info", task.value))
                })?;
            match soap::parse_task_info(info) {
                TaskState::Success(result) => return Ok(Ok(result)),
                TaskState::Error(fault) => return Ok(Err(fault)),
                TaskState::Pending => {}
            }
            let now = self.transport.now();
            if now >= deadline {
                return Err(Error::io(format!(
                    "{what}: task {} still runs after {} s; it goes on in vCenter, repeat the call \
                     to wait for it",
                    task.value,
                    OPERATION_BUDGET.as_secs()
                )));
            }
            self.transport.sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    fn deadline(&self, budget: Duration) -> Duration {
        self.transport.now() + budget
    }

    // ---------------------------------------------------------------- properties

    /// Properties of `objects`; an object that does not exist is left out.
    fn retrieve_objects(
        &mut self,
        what: &str,
        objects: &[Moref],
        specs: &[PropSpec<'_>],
    ) -> Result<Vec<ObjectContent>, Error> {
        match self.invoke(|c| soap::retrieve_objects(&c.property_collector, objects, specs))? {
            Ok(response) => self.collect(what, &response),
            Err(f) if f.kind == "ManagedObjectNotFound" => Ok(Vec::new()),
            Err(f) => Err(fault_error(what, &f)),
        }
    }

    /// Every object of `kinds` below `container`, with the properties `specs` name.
    fn retrieve_below(
        &mut self,
        what: &str,
        container: &Moref,
        kinds: &[&str],
        specs: &[PropSpec<'_>],
    ) -> Result<Vec<ObjectContent>, Error> {
        let response = self.call(&format!("{what}: CreateContainerView"), |c| {
            soap::create_container_view(&c.view_manager, container, kinds, true)
        })?;
        let view = soap::parse_returned_moref("CreateContainerView", &response)?;
        let result = self
            .call(&format!("{what}: RetrievePropertiesEx"), |c| {
                soap::retrieve_via_view(&c.property_collector, &view, specs)
            })
            .and_then(|r| self.collect(what, &r));
        // A view left behind is freed with the session; not worth failing the call for.
        let _ = self.invoke(|_| soap::destroy_view(&view));
        result
    }

    /// The objects of an answer, continuing while vCenter cut the result into pages.
    fn collect(&mut self, what: &str, response: &Element) -> Result<Vec<ObjectContent>, Error> {
        let (mut objects, mut token) = soap::parse_objects(response);
        let mut pages = 1;
        while let Some(t) = token.take() {
            pages += 1;
            if pages > 10_000 {
                return Err(Error::new(
                    ErrorKind::Limit,
                    format!("{what}: more than 10,000 pages of results"),
                ));
            }
            let next = self.call(&format!("{what}: ContinueRetrievePropertiesEx"), |c| {
                soap::continue_retrieve(&c.property_collector, &t)
            })?;
            let (more, next_token) = soap::parse_objects(&next);
            objects.extend(more);
            token = next_token;
        }
        Ok(objects)
    }

    /// A virtual machine's properties, `None` when it does not exist.
    fn vm(&mut self, id: &str, paths: &[&str]) -> Result<Option<ObjectContent>, Error> {
        let vm = vm_ref(id)?;
        let mut objects = self.retrieve_objects(
            &format!("reading machine {id}"),
            std::slice::from_ref(&vm),
            &[PropSpec {
                kind: "VirtualMachine",
                paths,
            }],
        )?;
        Ok(objects.pop())
    }

    fn existing_vm(&mut self, id: &str, paths: &[&str]) -> Result<ObjectContent, Error> {
        self.vm(id, paths)?.ok_or_else(|| {
            Error::not_found(format!(
                "virtual machine `{id}` does not exist on vCenter {}",
                self.settings.url
            ))
        })
    }

    fn datacenter(&mut self) -> Result<Datacenter, Error> {
        let root = self.content()?.root_folder;
        let objects = self.retrieve_below(
            "listing datacenters",
            &root,
            &["Datacenter"],
            &[PropSpec {
                kind: "Datacenter",
                paths: &["name", "vmFolder"],
            }],
        )?;
        let dcs: Vec<Datacenter> = objects
            .iter()
            .filter_map(|o| {
                Some(Datacenter {
                    moref: o.obj.clone(),
                    name: o.text("name").to_owned(),
                    vm_folder: o.moref("vmFolder")?,
                })
            })
            .collect();
        match &self.settings.datacenter {
            Some(name) => dcs
                .iter()
                .find(|d| &d.name == name)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = dcs.iter().map(|d| d.name.as_str()).collect();
                    Error::not_found(format!(
                        "setting `datacenter`: vCenter {} has no datacenter `{name}`; it has: {}",
                        self.settings.url,
                        if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        }
                    ))
                }),
            None => dcs.first().cloned().ok_or_else(|| {
                Error::not_found(format!("vCenter {} has no datacenter", self.settings.url))
            }),
        }
    }

    // ---------------------------------------------------------------- operations

    /// Logs in and describes the vCenter, the user and the datacenter.
    pub fn check(&mut self) -> Result<String, Error> {
        self.login()?;
        let content = self.content()?;
        let dc = self.datacenter()?;
        Ok(format!(
            "{} (API {}, instance {}) at {} as {}; datacenter {}",
            content.full_name,
            content.api_version,
            content.instance_uuid,
            self.settings.url,
            self.user_name,
            dc.name
        ))
    }

    /// Every virtual machine (of the `datacenter` setting's datacenter, when set), templates
    /// left out.
    pub fn inventory(&mut self) -> Result<Vec<Machine>, Error> {
        let root = self.content()?.root_folder;
        let objects = self.retrieve_below(
            "inventory",
            &root,
            inventory::VIEW_KINDS,
            &inventory::prop_specs(),
        )?;
        if let Some(dc) = &self.settings.datacenter
            && !objects
                .iter()
                .any(|o| o.obj.kind == "Datacenter" && o.text("name") == dc)
        {
            return Err(Error::not_found(format!(
                "setting `datacenter`: vCenter {} has no datacenter `{dc}`",
                self.settings.url
            )));
        }
        Ok(inventory::machines(
            &objects,
            self.settings.datacenter.as_deref(),
        ))
    }

    pub fn power_off(&mut self, id: &str, mode: PowerOffMode) -> Result<(), Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        let vm = self.existing_vm(id, &["runtime.powerState", "guest.toolsRunningStatus"])?;
        let state = PowerState::from_vim(vm.text("runtime.powerState"));
        if state == PowerState::Stopped {
            return Ok(());
        }
        if mode == PowerOffMode::Graceful && state == PowerState::Running {
            if vm.text("guest.toolsRunningStatus") == "guestToolsRunning" {
                match self.shutdown_guest(id)? {
                    true => return Ok(()),
                    false => self.transport.log(&format!(
                        "power-off {id}: the guest cannot shut down (tools unavailable); cutting the power"
                    )),
                }
            } else {
                self.transport.log(&format!(
                    "power-off {id}: VMware Tools are not running in the guest; cutting the power"
                ));
            }
        }
        self.hard_power_off(id, deadline)
    }

    /// Asks the guest to shut down and waits for it; `false` when the guest cannot be asked.
    fn shutdown_guest(&mut self, id: &str) -> Result<bool, Error> {
        let vm = vm_ref(id)?;
        match self.invoke(|_| soap::shutdown_guest(&vm))? {
            Ok(_) => {}
            Err(f) if matches!(f.kind.as_str(), "ToolsUnavailable" | "InvalidState") => {
                return Ok(false);
            }
            Err(f) if f.kind == "InvalidPowerState" => return Ok(true),
            Err(f) => return Err(fault_error(&format!("power-off {id}: ShutdownGuest"), &f)),
        }
        let deadline = self.deadline(GRACEFUL_BUDGET);
        loop {
            let state = self
                .vm(id, &["runtime.powerState"])?
                .map(|o| PowerState::from_vim(o.text("runtime.powerState")));
            if matches!(state, None | Some(PowerState::Stopped)) {
                return Ok(true);
            }
            if self.transport.now() >= deadline {
                return Err(Error::io(format!(
                    "power-off {id}: the guest did not shut down within {} s; power it off hard",
                    GRACEFUL_BUDGET.as_secs()
                )));
            }
            self.transport.sleep(Duration::from_millis(500));
        }
    }

    fn hard_power_off(&mut self, id: &str, deadline: Duration) -> Result<(), Error> {
        let what = format!("power-off {id}: PowerOffVM_Task");
        self.power_task(id, &what, deadline, PowerState::Stopped, soap::power_off)
    }

    pub fn power_on(&mut self, id: &str) -> Result<(), Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        let state = self.existing_vm(id, &["runtime.powerState"])?;
        if PowerState::from_vim(state.text("runtime.powerState")) == PowerState::Running {
            return Ok(());
        }
        let what = format!("power-on {id}: PowerOnVM_Task");
        self.power_task(id, &what, deadline, PowerState::Running, soap::power_on)
    }

    /// Runs a power task; `InvalidPowerState` with the machine already in `wanted` (changed
    /// meanwhile, or by someone else) is what was asked, so it succeeds.
    fn power_task(
        &mut self,
        id: &str,
        what: &str,
        deadline: Duration,
        wanted: PowerState,
        request: fn(&Moref) -> String,
    ) -> Result<(), Error> {
        let vm = vm_ref(id)?;
        match self.run_task(what, deadline, |_| request(&vm))? {
            Ok(_) => Ok(()),
            Err(f) if f.kind == "InvalidPowerState" => {
                let state = self.existing_vm(id, &["runtime.powerState"])?;
                if PowerState::from_vim(state.text("runtime.powerState")) == wanted {
                    Ok(())
                } else {
                    Err(fault_error(what, &f))
                }
            }
            Err(f) => Err(fault_error(what, &f)),
        }
    }

    pub fn create_snapshot(&mut self, id: &str, name: &str) -> Result<Snapshot, Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        let vm = vm_ref(id)?;
        let what = format!("create-snapshot {id}: CreateSnapshot_Task");
        let result = self
            .run_task(&what, deadline, |_| {
                soap::create_snapshot(&vm, name, "Taken by Haven")
            })?
            .map_err(|f| fault_error(&what, &f))?;
        let snapshot = result
            .as_ref()
            .and_then(Moref::from_element)
            .ok_or_else(|| Error::platform(format!("{what}: the task returned no snapshot")))?;
        // Change ids exist when changed block tracking is on; vcsim has none.
        let objects = self.retrieve_objects(
            &format!("create-snapshot {id}: reading snapshot {}", snapshot.value),
            std::slice::from_ref(&snapshot),
            &[PropSpec {
                kind: "VirtualMachineSnapshot",
                paths: &["config.hardware.device"],
            }],
        )?;
        let change_ids = objects
            .first()
            .and_then(|o| o.prop("config.hardware.device"))
            .map(|devices| {
                devices
                    .children
                    .iter()
                    .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
                    .filter_map(|d| {
                        let change = d.text_at(&["backing", "changeId"])?;
                        (!change.is_empty()).then(|| {
                            (
                                d.text_at(&["key"]).unwrap_or_default().to_owned(),
                                change.to_owned(),
                            )
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.transport
            .log(&format!("snapshot {} of {id} taken", snapshot.value));
        Ok(Snapshot {
            id: snapshot.value,
            change_ids,
        })
    }

    /// Deletes snapshot `snapshot` of `id`; one already gone is not an error.
    pub fn delete_snapshot(&mut self, id: &str, snapshot: &str) -> Result<(), Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        if snapshot.is_empty() {
            return Err(Error::invalid("delete-snapshot: empty snapshot id"));
        }
        let snap = Moref::new("VirtualMachineSnapshot", snapshot);
        let owner = self.retrieve_objects(
            &format!("delete-snapshot {id}: reading snapshot {snapshot}"),
            std::slice::from_ref(&snap),
            &[PropSpec {
                kind: "VirtualMachineSnapshot",
                paths: &["vm"],
            }],
        )?;
        let Some(owner) = owner.first() else {
            return Ok(());
        };
        if owner.moref("vm").map(|m| m.value).as_deref() != Some(id) {
            return Err(Error::invalid(format!(
                "delete-snapshot: snapshot {snapshot} is not a snapshot of machine {id}"
            )));
        }
        let what = format!("delete-snapshot {id}: RemoveSnapshot_Task {snapshot}");
        match self.run_task(&what, deadline, |_| soap::remove_snapshot(&snap))? {
            Ok(_) => Ok(()),
            Err(f) if f.kind == "ManagedObjectNotFound" => Ok(()),
            Err(f) => Err(fault_error(&what, &f)),
        }
    }

    pub fn define_replica(&mut self, spec: &ReplicaSpec) -> Result<ReplicaMachine, Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        replica::check_spec(spec)?;
        let options = Options::parse(&spec.options)?;
        let dc = self.datacenter()?;
        let mut kinds = replica::PLACEMENT_KINDS.to_vec();
        kinds.push("VirtualMachine");
        let mut specs = replica::placement_specs();
        specs.push(PropSpec {
            kind: "VirtualMachine",
            paths: &["name"],
        });
        let objects = self.retrieve_below(
            &format!(
                "define-replica `{}`: reading datacenter {}",
                spec.name, dc.name
            ),
            &dc.moref,
            &kinds,
            &specs,
        )?;
        let name = spec.name.trim();
        let placement = replica::place(spec, &options, &dc.name, &dc.vm_folder, &objects)?;
        let existing: Vec<String> = objects
            .iter()
            .filter(|o| o.obj.kind == "VirtualMachine" && o.text("name") == name)
            .map(|o| o.obj.value.clone())
            .collect();
        if let Some(id) = existing.first() {
            // The same replica defined before (a retry whose first answer was lost): it is
            // the answer again. Anything else of that name is not ours to take.
            if existing.len() == 1 && self.is_defined_replica(id, spec)? {
                self.transport.log(&format!(
                    "replica `{name}` of {} was defined already as {id}",
                    spec.source_machine
                ));
                return Ok(ReplicaMachine {
                    definition: replica::definition(id, spec, &options, &placement),
                    id: id.clone(),
                });
            }
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "define-replica: a machine named `{name}` exists already in datacenter {} \
                     ({}) and is not this replica (other disks, or not defined by Haven for \
                     `{}`); delete or rename it, or give the replica another name",
                    dc.name,
                    existing.join(", "),
                    spec.source_machine
                ),
            ));
        }
        let config = replica::config_spec(spec, &options, &placement);
        let what = format!("define-replica `{name}`: CreateVM_Task");
        let result = self
            .run_task(&what, deadline, |_| {
                soap::create_vm(
                    &placement.folder,
                    &config,
                    &placement.pool,
                    placement.host.as_ref(),
                )
            })?
            .map_err(|f| fault_error(&what, &f))?;
        let vm = result
            .as_ref()
            .and_then(Moref::from_element)
            .ok_or_else(|| Error::platform(format!("{what}: the task returned no machine")))?;
        self.transport.log(&format!(
            "replica `{name}` of {} defined as {} in datacenter {}",
            spec.source_machine, vm.value, dc.name
        ));
        Ok(ReplicaMachine {
            definition: replica::definition(&vm.value, spec, &options, &placement),
            id: vm.value,
        })
    }

    /// Whether machine `id` is the replica `spec` describes, defined by Haven: it carries
    /// Haven's mark naming the same source machine, and exactly the spec's disk files.
    fn is_defined_replica(&mut self, id: &str, spec: &ReplicaSpec) -> Result<bool, Error> {
        let Some(vm) = self.vm(id, &["config.hardware.device", "config.extraConfig"])? else {
            return Ok(false);
        };
        let source = vm.prop("config.extraConfig").and_then(|extra| {
            extra
                .children
                .iter()
                .find(|o| o.text_at(&["key"]) == Some(replica::SOURCE_KEY))
                .map(|o| o.text_at(&["value"]).unwrap_or_default().to_string())
        });
        if source.as_deref() != Some(spec.source_machine.as_str()) {
            return Ok(false);
        }
        let mut files: Vec<String> = vm
            .prop("config.hardware.device")
            .map(|d| d.children.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
            .filter_map(|d| d.text_at(&["backing", "fileName"]))
            .map(str::to_string)
            .collect();
        let mut wanted: Vec<String> = spec.disks.iter().map(|d| d.location.clone()).collect();
        files.sort();
        wanted.sort();
        Ok(files == wanted)
    }

    /// Powers off, detaches the disks (keeping their files) and destroys a machine Haven
    /// defined. A machine that does not exist is not an error.
    pub fn delete_machine(&mut self, id: &str) -> Result<(), Error> {
        let deadline = self.deadline(OPERATION_BUDGET);
        let Some(vm) = self.vm(
            id,
            &[
                "name",
                "runtime.powerState",
                "config.hardware.device",
                "config.extraConfig",
            ],
        )?
        else {
            return Ok(());
        };
        let name = vm.text("name").to_owned();
        let defined_by_haven = vm.prop("config.extraConfig").is_some_and(|extra| {
            extra
                .children
                .iter()
                .any(|o| o.text_at(&["key"]) == Some(replica::SOURCE_KEY))
        });
        if !defined_by_haven {
            return Err(Error::invalid(format!(
                "delete-machine: {id} (`{name}`) was not defined by Haven (it has no extraConfig \
                 `{}`); refusing to delete it",
                replica::SOURCE_KEY
            )));
        }
        let gone = |r: &Result<Option<Element>, Fault>| matches!(r, Err(f) if f.kind == "ManagedObjectNotFound");

        if PowerState::from_vim(vm.text("runtime.powerState")) != PowerState::Stopped {
            match self.hard_power_off(id, deadline) {
                Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
                other => other?,
            }
        }

        let vm_moref = vm_ref(id)?;
        let devices: &[Element] = vm
            .prop("config.hardware.device")
            .map(|d| d.children.as_slice())
            .unwrap_or_default();
        if let Some(spec) = replica::detach_disks_spec(devices) {
            let what = format!("delete-machine {id}: ReconfigVM_Task (detaching its disks)");
            let result = self.run_task(&what, deadline, |_| soap::reconfig_vm(&vm_moref, &spec))?;
            if gone(&result) {
                return Ok(());
            }
            result.map_err(|f| fault_error(&what, &f))?;
        }

        let what = format!("delete-machine {id}: Destroy_Task");
        let result = self.run_task(&what, deadline, |_| soap::destroy(&vm_moref))?;
        if gone(&result) {
            return Ok(());
        }
        result.map_err(|f| fault_error(&what, &f))?;
        self.transport.log(&format!(
            "machine {id} (`{name}`) deleted; its disks were kept"
        ));
        Ok(())
    }
}

/// The moref of machine `id`, refusing what cannot be one.
fn vm_ref(id: &str) -> Result<Moref, Error> {
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!(
            "`{}` is not a virtual machine id (a managed object id like vm-42)",
            escape(id)
        )));
    }
    Ok(Moref::new("VirtualMachine", id))
}

/// A fault as an error: what was being done and what vCenter said.
pub fn fault_error(what: &str, f: &Fault) -> Error {
    let kind = match f.kind.as_str() {
        "ManagedObjectNotFound" | "FileNotFound" | "NotFound" => ErrorKind::NotFound,
        "DuplicateName" | "AlreadyExists" | "FileAlreadyExists" => ErrorKind::AlreadyExists,
        "NotSupported" | "NotImplemented" | "MethodNotFound" => ErrorKind::Unsupported,
        _ => ErrorKind::Platform,
    };
    let mut message = format!("{what}: vCenter answered {}", f.describe());
    if let Some(privilege) = f.detail.as_ref().and_then(|d| d.text_at(&["privilegeId"]))
        && !privilege.is_empty()
    {
        message += &format!(" (privilege {privilege})");
    }
    Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A scripted vCenter: answers in order, records (method, cookie) of every request.
    struct Script {
        answers: VecDeque<(&'static str, HttpAnswer)>,
        seen: Vec<(String, Option<String>)>,
        clock: Duration,
        sleeps: Vec<Duration>,
    }

    fn method(body: &str) -> String {
        let start = body.find("<soapenv:Body><").unwrap() + "<soapenv:Body><".len();
        body[start..].split([' ', '>']).next().unwrap().to_owned()
    }

    impl Transport for Script {
        fn post(
            &mut self,
            url: &str,
            cookie: Option<&str>,
            body: &str,
        ) -> Result<HttpAnswer, Error> {
            assert_eq!(url, "https://vc.example/sdk");
            let m = method(body);
            self.seen.push((m.clone(), cookie.map(str::to_owned)));
            let (expected, answer) = self
                .answers
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected request {m}"));
            assert_eq!(m, expected, "request order");
            Ok(answer)
        }
        fn sleep(&mut self, d: Duration) {
            self.sleeps.push(d);
            self.clock += d;
        }
        fn now(&self) -> Duration {
            self.clock
        }
    }

    fn ok(method: &str, inner: &str) -> HttpAnswer {
        HttpAnswer {
            status: 200,
            set_cookie: vec![],
            body: soap::envelope(&format!(
                r#"<{method}Response xmlns="urn:vim25">{inner}</{method}Response>"#
            ))
            .into_bytes(),
        }
    }

    fn fault(kind: &str, message: &str) -> HttpAnswer {
        HttpAnswer {
            status: 500,
            set_cookie: vec![],
            body: soap::envelope(&format!(
                r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{message}</faultstring><detail><{kind}Fault xmlns="urn:vim25" xsi:type="{kind}"/></detail></soapenv:Fault>"#
            ))
            .into_bytes(),
        }
    }

    const CONTENT: &str = r#"<returnval><rootFolder type="Folder">group-d1</rootFolder><propertyCollector type="PropertyCollector">propertyCollector</propertyCollector><viewManager type="ViewManager">ViewManager</viewManager><sessionManager type="SessionManager">SessionManager</sessionManager><about><fullName>VMware vCenter Server 6.5.0 build-1</fullName><apiType>VirtualCenter</apiType><apiVersion>6.5</apiVersion><instanceUuid>u-1</instanceUuid></about></returnval>"#;

    fn login(session: &str) -> HttpAnswer {
        let mut a = ok("Login", "<returnval><userName>haven</userName></returnval>");
        a.set_cookie = vec![format!(
            "vmware_soap_session=\"{session}\"; Path=/; HttpOnly"
        )];
        a
    }

    fn props(obj: &str, kind: &str, props: &[(&str, &str)]) -> HttpAnswer {
        let props: String = props
            .iter()
            .map(|(n, v)| format!("<propSet><name>{n}</name><val>{v}</val></propSet>"))
            .collect();
        ok(
            "RetrievePropertiesEx",
            &format!(
                r#"<returnval><objects><obj type="{kind}">{obj}</obj>{props}</objects></returnval>"#
            ),
        )
    }

    fn task(state: &str, extra: &str) -> HttpAnswer {
        ok(
            "RetrievePropertiesEx",
            &format!(
                r#"<returnval><objects><obj type="Task">task-1</obj><propSet><name>info</name><val><state>{state}</state>{extra}</val></propSet></objects></returnval>"#
            ),
        )
    }

    /// A client whose first exchanges are the service content and a login (session `s1`),
    /// then `then`.
    fn logged_in(then: Vec<(&'static str, HttpAnswer)>) -> Client<Script> {
        let mut answers = vec![
            (
                "RetrieveServiceContent",
                ok("RetrieveServiceContent", CONTENT),
            ),
            ("Login", login("s1")),
        ];
        answers.extend(then);
        client(answers)
    }

    fn client(answers: Vec<(&'static str, HttpAnswer)>) -> Client<Script> {
        Client::new(
            Script {
                answers: answers.into(),
                seen: Vec::new(),
                clock: Duration::ZERO,
                sleeps: Vec::new(),
            },
            Settings {
                url: "https://vc.example/sdk".into(),
                user: "haven".into(),
                password: "s3cret".into(),
                datacenter: None,
            },
        )
    }

    fn seen(c: &mut Client<Script>) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut c.transport().seen)
    }

    #[test]
    fn logs_in_once_keeps_the_cookie_and_logs_in_again_when_the_session_is_gone() {
        let mut c = logged_in(vec![
            (
                "RetrievePropertiesEx",
                props(
                    "vm-1",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOff")],
                ),
            ),
            ("RetrievePropertiesEx", fault("NotAuthenticated", "")),
            ("Login", login("s2")),
            (
                "RetrievePropertiesEx",
                props(
                    "vm-1",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOff")],
                ),
            ),
            // vcsim's way of saying the same: every property missing, NotAuthenticated.
            (
                "RetrievePropertiesEx",
                ok(
                    "RetrievePropertiesEx",
                    r#"<returnval><objects><obj type="VirtualMachine">vm-1</obj><missingSet><path>runtime.powerState</path><fault><fault xsi:type="NotAuthenticated"/></fault></missingSet></objects></returnval>"#,
                ),
            ),
            ("Login", login("s3")),
            (
                "RetrievePropertiesEx",
                props(
                    "vm-1",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOff")],
                ),
            ),
        ]);
        c.power_off("vm-1", PowerOffMode::Hard).unwrap();
        c.power_off("vm-1", PowerOffMode::Graceful).unwrap();
        c.power_off("vm-1", PowerOffMode::Hard).unwrap();
        let s1 = Some("vmware_soap_session=\"s1\"".to_owned());
        let s2 = Some("vmware_soap_session=\"s2\"".to_owned());
        let s3 = Some("vmware_soap_session=\"s3\"".to_owned());
        assert_eq!(
            seen(&mut c),
            vec![
                ("RetrieveServiceContent".into(), None),
                ("Login".into(), None),
                ("RetrievePropertiesEx".into(), s1.clone()),
                ("RetrievePropertiesEx".into(), s1),
                ("Login".into(), None),
                ("RetrievePropertiesEx".into(), s2.clone()),
                ("RetrievePropertiesEx".into(), s2),
                ("Login".into(), None),
                ("RetrievePropertiesEx".into(), s3),
            ]
        );
    }

    #[test]
    fn a_refused_login_names_the_settings_and_not_the_password() {
        let mut c = client(vec![
            (
                "RetrieveServiceContent",
                ok("RetrieveServiceContent", CONTENT),
            ),
            ("Login", fault("InvalidLogin", "Login failure")),
        ]);
        let err = c.check().unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert_eq!(
            err.message,
            "vCenter at https://vc.example/sdk refused the login of user `haven` (InvalidLogin): \
             check the settings `user` and `password`"
        );
        assert!(!format!("{:?}", c.settings()).contains("s3cret"));
    }

    #[test]
    fn tasks_are_polled_until_done_and_their_faults_reported() {
        let mut c = logged_in(vec![
            (
                "RetrievePropertiesEx",
                props(
                    "vm-1",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOff")],
                ),
            ),
            (
                "PowerOnVM_Task",
                ok(
                    "PowerOnVM_Task",
                    r#"<returnval type="Task">task-1</returnval>"#,
                ),
            ),
            ("RetrievePropertiesEx", task("queued", "")),
            ("RetrievePropertiesEx", task("running", "")),
            ("RetrievePropertiesEx", task("success", "")),
            (
                "RetrievePropertiesEx",
                props(
                    "vm-2",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOff")],
                ),
            ),
            (
                "PowerOnVM_Task",
                ok(
                    "PowerOnVM_Task",
                    r#"<returnval type="Task">task-1</returnval>"#,
                ),
            ),
            (
                "RetrievePropertiesEx",
                task(
                    "error",
                    r#"<error><fault xmlns:x="http://www.w3.org/2001/XMLSchema-instance" x:type="InsufficientResourcesFault"/><localizedMessage>Insufficient resources</localizedMessage></error>"#,
                ),
            ),
        ]);
        c.power_on("vm-1").unwrap();
        assert_eq!(
            c.transport().sleeps,
            vec![Duration::from_millis(25), Duration::from_millis(50)]
        );
        let err = c.power_on("vm-2").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Platform);
        assert_eq!(
            err.message,
            "power-on vm-2: PowerOnVM_Task: vCenter answered InsufficientResourcesFault: Insufficient resources"
        );
    }

    #[test]
    fn a_task_that_never_ends_is_given_up_after_the_budget() {
        let mut answers = vec![
            (
                "RetrieveServiceContent",
                ok("RetrieveServiceContent", CONTENT),
            ),
            ("Login", login("s1")),
            (
                "RetrievePropertiesEx",
                props(
                    "vm-1",
                    "VirtualMachine",
                    &[("runtime.powerState", "poweredOn")],
                ),
            ),
            (
                "PowerOffVM_Task",
                ok(
                    "PowerOffVM_Task",
                    r#"<returnval type="Task">task-1</returnval>"#,
                ),
            ),
        ];
        for _ in 0..40 {
            answers.push(("RetrievePropertiesEx", task("running", "")));
        }
        let mut c = client(answers);
        let err = c.power_off("vm-1", PowerOffMode::Hard).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Io);
        assert!(
            err.message.contains("task task-1 still runs after 25 s"),
            "{}",
            err.message
        );
        assert_eq!(c.transport().clock, OPERATION_BUDGET);
    }

    #[test]
    fn delete_machine_leaves_other_machines_alone_and_accepts_a_missing_one() {
        let mut c = logged_in(vec![
            (
                "RetrievePropertiesEx",
                props(
                    "vm-7",
                    "VirtualMachine",
                    &[
                        ("name", "prod-db"),
                        ("runtime.powerState", "poweredOn"),
                        (
                            "config.extraConfig",
                            "<OptionValue><key>govcsim</key><value>TRUE</value></OptionValue>",
                        ),
                    ],
                ),
            ),
            (
                "RetrievePropertiesEx",
                fault("ManagedObjectNotFound", "gone"),
            ),
        ]);
        let err = c.delete_machine("vm-7").unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert_eq!(
            err.message,
            "delete-machine: vm-7 (`prod-db`) was not defined by Haven (it has no extraConfig \
             `guestinfo.haven.source-machine`); refusing to delete it"
        );
        c.delete_machine("vm-8").unwrap();
        assert_eq!(
            seen(&mut c).len(),
            4,
            "nothing was powered off or destroyed"
        );
    }

    #[test]
    fn settings_are_checked() {
        let good = Settings {
            url: "http://127.0.0.1:8989/sdk".into(),
            user: "u".into(),
            password: "p".into(),
            datacenter: None,
        };
        good.check().unwrap();
        let bad = Settings {
            url: "http://user:pass@127.0.0.1:8989/sdk".into(),
            ..good.clone()
        };
        assert!(
            bad.check()
                .unwrap_err()
                .message
                .starts_with("setting `url`:")
        );
        let bad = Settings {
            url: "vcenter.example".into(),
            ..good.clone()
        };
        assert!(
            bad.check()
                .unwrap_err()
                .message
                .starts_with("setting `url`:")
        );
        let bad = Settings {
            password: String::new(),
            ..good
        };
        assert_eq!(
            bad.check().unwrap_err().message,
            "setting `password` is empty"
        );
    }
}
