//! The vSphere Web Services (SOAP, `urn:vim25`) messages this adapter sends, and the parsing of
//! what comes back. No I/O: requests are strings, answers are bytes in.
//!
//! Every request is a method call on a managed object: `<Method xmlns="urn:vim25"><_this
//! type="Kind">value</_this>…parameters…</Method>` in a SOAP 1.1 envelope, posted to the SDK URL
//! with `SOAPAction: "urn:vim25/6.5"`. Values are escaped with [`escape`]; polymorphic
//! parameters carry `xsi:type`.

use crate::model::Error;
use crate::xml::{Element, escape};

/// The SOAPAction of every request: the vim25 namespace and the API version spoken (6.5, the
/// version vcsim 0.24.2 models; later vCenters accept it).
pub const SOAP_ACTION: &str = "urn:vim25/6.5";

/// A managed object reference: a type and a server-side id (`VirtualMachine`, `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Moref {
    pub kind: String,
    pub value: String,
}

impl Moref {
    pub fn new(kind: &str, value: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        }
    }

    /// `<tag type="kind">value</tag>`.
    pub fn xml(&self, tag: &str) -> String {
        format!(
            r#"<{tag} type="{}">{}</{tag}>"#,
            escape(&self.kind),
            escape(&self.value)
        )
    }

    /// The reference an element carries (its `type` attribute and text), if it carries one.
    pub fn from_element(e: &Element) -> Option<Self> {
        let kind = e.ref_type.as_deref()?;
        let value = e.value();
        (!value.is_empty()).then(|| Self::new(kind, value))
    }
}

/// Wraps a method call into a SOAP envelope.
pub fn envelope(call: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
            r#" xmlns:xsd="http://www.w3.org/2001/XMLSchema""#,
            r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
            "<soapenv:Body>{}</soapenv:Body></soapenv:Envelope>"
        ),
        call
    )
}

/// `method` called on `this` with the already-built `params`, in an envelope.
pub fn call(method: &str, this: &Moref, params: &str) -> String {
    envelope(&format!(
        r#"<{method} xmlns="urn:vim25">{}{params}</{method}>"#,
        this.xml("_this")
    ))
}

/// A SOAP fault: vSphere's fault type and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The fault's type without the `Fault` suffix: `NotAuthenticated`,
    /// `ManagedObjectNotFound`, `InvalidLogin` … (`ServerFault` when the detail names none).
    pub kind: String,
    /// The fault string (may be empty).
    pub message: String,
    /// The detail element (the fault object), for faults whose fields matter.
    pub detail: Option<Element>,
}

impl Fault {
    /// `Kind: message`, or just `Kind` when there is no message.
    pub fn describe(&self) -> String {
        if self.message.is_empty() || self.message == self.kind {
            self.kind.clone()
        } else {
            format!("{}: {}", self.kind, self.message)
        }
    }
}

/// Parses an answer to a call: the `…Response` element, or the fault.
///
/// Fails (with `platform`) only when the answer is not SOAP at all: a proxy's error page, an
/// empty body. The message carries the HTTP status and the start of the body.
pub fn parse_answer(status: u16, body: &[u8]) -> Result<Result<Element, Fault>, Error> {
    let not_soap = |why: &str| {
        Error::platform(format!(
            "HTTP {status} with {why}: {}",
            crate::excerpt(body, 200)
        ))
    };
    let text = std::str::from_utf8(body).map_err(|_| not_soap("a body that is not UTF-8"))?;
    let root =
        Element::parse(text).map_err(|e| not_soap(&format!("a body that is not XML ({e})")))?;
    let Some(answer) = root.child("Body").and_then(|b| b.children.first()) else {
        return Err(not_soap("no SOAP body"));
    };
    if answer.name != "Fault" {
        return Ok(Ok(answer.clone()));
    }
    let detail = answer.child("detail").and_then(|d| d.children.first());
    let kind = detail
        .map(|d| {
            d.xsi_type
                .clone()
                .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_owned())
        })
        .unwrap_or_else(|| "ServerFault".to_owned());
    Ok(Err(Fault {
        kind,
        message: answer
            .text_at(&["faultstring"])
            .unwrap_or_default()
            .to_owned(),
        detail: detail.cloned(),
    }))
}

/// What `RetrieveServiceContent` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    pub root_folder: Moref,
    pub property_collector: Moref,
    pub view_manager: Moref,
    pub session_manager: Moref,
    /// `about.fullName`: `VMware vCenter Server 6.5.0 build-5973321`.
    pub full_name: String,
    /// `about.apiType`: `VirtualCenter` or `HostAgent` (a lone ESXi).
    pub api_type: String,
    pub api_version: String,
    pub instance_uuid: String,
}

pub fn retrieve_service_content() -> String {
    call(
        "RetrieveServiceContent",
        &Moref::new("ServiceInstance", "ServiceInstance"),
        "",
    )
}

pub fn parse_service_content(response: &Element) -> Result<ServiceContent, Error> {
    let rv = response
        .child("returnval")
        .ok_or_else(|| Error::platform("RetrieveServiceContent answered without a returnval"))?;
    let moref = |name: &str| {
        rv.child(name).and_then(Moref::from_element).ok_or_else(|| {
            Error::platform(format!(
                "the service content names no {name}; is this a vCenter SDK URL?"
            ))
        })
    };
    let about = |name: &str| rv.text_at(&["about", name]).unwrap_or_default().to_owned();
    Ok(ServiceContent {
        root_folder: moref("rootFolder")?,
        property_collector: moref("propertyCollector")?,
        view_manager: moref("viewManager")?,
        session_manager: moref("sessionManager")?,
        full_name: about("fullName"),
        api_type: about("apiType"),
        api_version: about("apiVersion"),
        instance_uuid: about("instanceUuid"),
    })
}

pub fn login(session_manager: &Moref, user: &str, password: &str) -> String {
    call(
        "Login",
        session_manager,
        &format!(
            "<userName>{}</userName><password>{}</password>",
            escape(user),
            escape(password)
        ),
    )
}

/// The `userName` of a `Login` answer.
pub fn parse_login(response: &Element) -> String {
    response
        .text_at(&["returnval", "userName"])
        .unwrap_or_default()
        .to_owned()
}

pub fn create_container_view(
    view_manager: &Moref,
    container: &Moref,
    kinds: &[&str],
    recursive: bool,
) -> String {
    let kinds: String = kinds
        .iter()
        .map(|k| format!("<type>{}</type>", escape(k)))
        .collect();
    call(
        "CreateContainerView",
        view_manager,
        &format!(
            "{}{kinds}<recursive>{recursive}</recursive>",
            container.xml("container")
        ),
    )
}

pub fn destroy_view(view: &Moref) -> String {
    call("DestroyView", view, "")
}

/// The moref a call returned (`returnval`), e.g. a task or a view.
pub fn parse_returned_moref(method: &str, response: &Element) -> Result<Moref, Error> {
    response
        .child("returnval")
        .and_then(Moref::from_element)
        .ok_or_else(|| Error::platform(format!("{method} answered without a managed object")))
}

/// Properties to retrieve of objects of one type.
#[derive(Debug, Clone, Copy)]
pub struct PropSpec<'a> {
    pub kind: &'a str,
    pub paths: &'a [&'a str],
}

fn prop_set(specs: &[PropSpec<'_>]) -> String {
    specs
        .iter()
        .map(|s| {
            let paths: String = s
                .paths
                .iter()
                .map(|p| format!("<pathSet>{}</pathSet>", escape(p)))
                .collect();
            format!("<propSet><type>{}</type>{paths}</propSet>", escape(s.kind))
        })
        .collect()
}

/// `RetrievePropertiesEx` of the objects a container view shows.
pub fn retrieve_via_view(
    property_collector: &Moref,
    view: &Moref,
    specs: &[PropSpec<'_>],
) -> String {
    call(
        "RetrievePropertiesEx",
        property_collector,
        &format!(
            concat!(
                "<specSet>{}<objectSet>{}<skip>true</skip>",
                r#"<selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type>"#,
                "<path>view</path><skip>false</skip></selectSet></objectSet></specSet>",
                "<options><maxObjects>500</maxObjects></options>"
            ),
            prop_set(specs),
            view.xml("obj")
        ),
    )
}

/// `RetrievePropertiesEx` of the given objects.
pub fn retrieve_objects(
    property_collector: &Moref,
    objects: &[Moref],
    specs: &[PropSpec<'_>],
) -> String {
    let objects: String = objects
        .iter()
        .map(|o| format!("<objectSet>{}<skip>false</skip></objectSet>", o.xml("obj")))
        .collect();
    call(
        "RetrievePropertiesEx",
        property_collector,
        &format!("<specSet>{}{objects}</specSet><options/>", prop_set(specs)),
    )
}

pub fn continue_retrieve(property_collector: &Moref, token: &str) -> String {
    call(
        "ContinueRetrievePropertiesEx",
        property_collector,
        &format!("<token>{}</token>", escape(token)),
    )
}

/// One object's retrieved properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    pub obj: Moref,
    /// Property path → its `val` element.
    pub props: Vec<(String, Element)>,
}

impl ObjectContent {
    pub fn prop(&self, path: &str) -> Option<&Element> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// The trimmed text of a property, or "" when missing.
    pub fn text(&self, path: &str) -> &str {
        self.prop(path).map(Element::value).unwrap_or_default()
    }

    /// A property holding a managed object reference.
    pub fn moref(&self, path: &str) -> Option<Moref> {
        self.prop(path).and_then(Moref::from_element)
    }

    /// A property holding an array of managed object references.
    pub fn morefs(&self, path: &str) -> Vec<Moref> {
        self.prop(path)
            .map(|v| v.children.iter().filter_map(Moref::from_element).collect())
            .unwrap_or_default()
    }
}

/// The objects of a `RetrievePropertiesEx` or `ContinueRetrievePropertiesEx` answer and the
/// token to continue with, if the result was cut.
pub fn parse_objects(response: &Element) -> (Vec<ObjectContent>, Option<String>) {
    let Some(rv) = response.child("returnval") else {
        // Nothing matched: vSphere leaves the result out.
        return (Vec::new(), None);
    };
    let objects = rv
        .children_named("objects")
        .filter_map(|o| {
            let obj = o.child("obj").and_then(Moref::from_element)?;
            let props = o
                .children_named("propSet")
                .filter_map(|p| Some((p.text_at(&["name"])?.to_owned(), p.child("val")?.clone())))
                .collect();
            Some(ObjectContent { obj, props })
        })
        .collect();
    let token = rv
        .text_at(&["token"])
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    (objects, token)
}

/// True when a property answer lists properties as missing for want of a session: vcsim
/// answers so (a `missingSet` entry with a `NotAuthenticated` fault per property) where vCenter
/// answers with a `NotAuthenticated` fault; both mean "log in again".
pub fn lacks_session(response: &Element) -> bool {
    response.child("returnval").is_some_and(|rv| {
        rv.children_named("objects").any(|o| {
            o.children_named("missingSet").any(|m| {
                m.at(&["fault", "fault"])
                    .and_then(|f| f.xsi_type.as_deref())
                    == Some("NotAuthenticated")
            })
        })
    })
}

pub fn power_on(vm: &Moref) -> String {
    call("PowerOnVM_Task", vm, "")
}

pub fn power_off(vm: &Moref) -> String {
    call("PowerOffVM_Task", vm, "")
}

pub fn shutdown_guest(vm: &Moref) -> String {
    call("ShutdownGuest", vm, "")
}

pub fn create_snapshot(vm: &Moref, name: &str, description: &str) -> String {
    call(
        "CreateSnapshot_Task",
        vm,
        &format!(
            "<name>{}</name><description>{}</description><memory>false</memory><quiesce>false</quiesce>",
            escape(name),
            escape(description)
        ),
    )
}

pub fn remove_snapshot(snapshot: &Moref) -> String {
    call(
        "RemoveSnapshot_Task",
        snapshot,
        "<removeChildren>false</removeChildren><consolidate>true</consolidate>",
    )
}

/// `CreateVM_Task` in `folder` with the `VirtualMachineConfigSpec` body `config` (its child
/// elements).
pub fn create_vm(folder: &Moref, config: &str, pool: &Moref, host: Option<&Moref>) -> String {
    call(
        "CreateVM_Task",
        folder,
        &format!(
            "<config>{config}</config>{}{}",
            pool.xml("pool"),
            host.map(|h| h.xml("host")).unwrap_or_default()
        ),
    )
}

/// `ReconfigVM_Task` with the `VirtualMachineConfigSpec` body `spec`.
pub fn reconfig_vm(vm: &Moref, spec: &str) -> String {
    call("ReconfigVM_Task", vm, &format!("<spec>{spec}</spec>"))
}

pub fn destroy(entity: &Moref) -> String {
    call("Destroy_Task", entity, "")
}

/// The state of a task, from its `info` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Queued or running.
    Pending,
    /// Done; the result element, if the task has one.
    Success(Option<Element>),
    /// Failed with this fault.
    Error(Fault),
}

/// Reads a `TaskInfo` element.
pub fn parse_task_info(info: &Element) -> TaskState {
    match info.text_at(&["state"]).unwrap_or_default() {
        "success" => TaskState::Success(info.child("result").cloned()),
        "error" => {
            let error = info.child("error");
            let fault = error.and_then(|e| e.child("fault"));
            let kind = fault
                .and_then(|f| f.xsi_type.clone())
                .unwrap_or_else(|| "TaskError".to_owned());
            let mut message = error
                .and_then(|e| e.text_at(&["localizedMessage"]))
                .unwrap_or_default()
                .to_owned();
            // vcsim puts the Go type name here (`*types.InvalidPowerState`): no message at all.
            if message.starts_with("*types.") {
                message.clear();
            }
            if message.is_empty() {
                // The first message a fault carries (`faultMessage`), if any.
                message = fault
                    .and_then(|f| f.find("message"))
                    .map(|m| m.value().to_owned())
                    .unwrap_or_default();
            }
            TaskState::Error(Fault {
                kind,
                message,
                detail: fault.cloned(),
            })
        }
        _ => TaskState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCSIM_FAULT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>managed object not found: VirtualMachine:vm-999</faultstring><detail><ManagedObjectNotFoundFault xmlns="urn:vim25" xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-999</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn call_escapes_and_types_this() {
        let body = login(
            &Moref::new("SessionManager", "SessionManager"),
            "a<b",
            "p&'\"",
        );
        assert!(body.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope"#));
        assert!(body.contains(
            r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>a&lt;b</userName><password>p&amp;&apos;&quot;</password></Login>"#
        ));
        // Every request parses as XML.
        Element::parse(&body).unwrap();
    }

    #[test]
    fn fault_kind_comes_from_the_detail() {
        let fault = parse_answer(500, VCSIM_FAULT.as_bytes())
            .unwrap()
            .unwrap_err();
        assert_eq!(fault.kind, "ManagedObjectNotFound");
        assert_eq!(
            fault.describe(),
            "ManagedObjectNotFound: managed object not found: VirtualMachine:vm-999"
        );
        // A detail without xsi:type: the element name without the suffix.
        let bare = VCSIM_FAULT.replace(r#" xsi:type="ManagedObjectNotFound""#, "");
        let fault = parse_answer(500, bare.as_bytes()).unwrap().unwrap_err();
        assert_eq!(fault.kind, "ManagedObjectNotFound");
    }

    #[test]
    fn a_body_that_is_not_soap_names_the_status_and_shows_the_body() {
        let err = parse_answer(502, b"<html>Bad gateway</html>").unwrap_err();
        assert_eq!(err.kind, crate::model::ErrorKind::Platform);
        assert_eq!(
            err.message,
            "HTTP 502 with no SOAP body: <html>Bad gateway</html>"
        );
        let err = parse_answer(404, b"404 page not found\n").unwrap_err();
        assert!(
            err.message
                .starts_with("HTTP 404 with a body that is not XML ("),
            "{}",
            err.message
        );
        assert!(
            err.message.ends_with("): 404 page not found "),
            "{}",
            err.message
        );
    }

    #[test]
    fn objects_and_token() {
        let answer = r#"<Envelope><Body><RetrievePropertiesExResponse><returnval>
            <token>t1</token>
            <objects><obj type="VirtualMachine">vm-1</obj>
              <propSet><name>name</name><val xsi:type="xsd:string" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">web &amp; db</val></propSet>
              <propSet><name>runtime.host</name><val type="HostSystem">host-2</val></propSet>
              <propSet><name>datastore</name><val><ManagedObjectReference type="Datastore">ds-1</ManagedObjectReference><ManagedObjectReference type="Datastore">ds-2</ManagedObjectReference></val></propSet>
            </objects></returnval></RetrievePropertiesExResponse></Body></Envelope>"#;
        let response = parse_answer(200, answer.as_bytes()).unwrap().unwrap();
        let (objects, token) = parse_objects(&response);
        assert_eq!(token.as_deref(), Some("t1"));
        assert_eq!(objects.len(), 1);
        let o = &objects[0];
        assert_eq!(o.obj, Moref::new("VirtualMachine", "vm-1"));
        assert_eq!(o.text("name"), "web & db");
        assert_eq!(
            o.moref("runtime.host"),
            Some(Moref::new("HostSystem", "host-2"))
        );
        assert_eq!(
            o.morefs("datastore"),
            vec![
                Moref::new("Datastore", "ds-1"),
                Moref::new("Datastore", "ds-2")
            ]
        );
        assert_eq!(o.text("missing"), "");

        let empty = Element::parse("<RetrievePropertiesExResponse/>").unwrap();
        assert_eq!(parse_objects(&empty), (Vec::new(), None));
    }

    #[test]
    fn missing_properties_for_want_of_a_session() {
        let vcsim = r#"<RetrievePropertiesExResponse><returnval><objects><obj type="VirtualMachine">vm-1</obj>
            <missingSet><path>name</path><fault><fault xmlns:x="http://www.w3.org/2001/XMLSchema-instance" x:type="NotAuthenticated"><object type="VirtualMachine">vm-1</object><privilegeId>System.Read</privilegeId></fault></fault></missingSet>
            </objects></returnval></RetrievePropertiesExResponse>"#;
        assert!(lacks_session(&Element::parse(vcsim).unwrap()));
        let other = vcsim.replace("NotAuthenticated", "InvalidProperty");
        assert!(!lacks_session(&Element::parse(&other).unwrap()));
    }

    #[test]
    fn task_info_states() {
        let info = |xml: &str| parse_task_info(&Element::parse(xml).unwrap());
        assert_eq!(
            info("<info><state>running</state></info>"),
            TaskState::Pending
        );
        assert_eq!(
            info("<info><state>queued</state></info>"),
            TaskState::Pending
        );
        let TaskState::Success(Some(result)) = info(
            r#"<info><state>success</state><result type="VirtualMachine">vm-9</result></info>"#,
        ) else {
            panic!()
        };
        assert_eq!(
            Moref::from_element(&result),
            Some(Moref::new("VirtualMachine", "vm-9"))
        );
        // vcsim's task error: the Go type name as the message.
        let vcsim = r#"<info xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><state>error</state><error><fault x:type="InvalidPowerState"><requestedState>poweredOff</requestedState><existingState>poweredOff</existingState></fault><localizedMessage>*types.InvalidPowerState</localizedMessage></error></info>"#;
        let TaskState::Error(fault) = info(vcsim) else {
            panic!()
        };
        assert_eq!(fault.kind, "InvalidPowerState");
        assert_eq!(fault.describe(), "InvalidPowerState");
        // vCenter's: a real message.
        let vcenter = r#"<info xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><state>error</state><error><fault x:type="FileNotFound"><file>[ds] a.vmdk</file></fault><localizedMessage>File [ds] a.vmdk was not found</localizedMessage></error></info>"#;
        let TaskState::Error(fault) = info(vcenter) else {
            panic!()
        };
        assert_eq!(
            fault.describe(),
            "FileNotFound: File [ds] a.vmdk was not found"
        );
    }
}
