//! Just enough XML: escaping values put into requests, and an owned element tree of answers.
//!
//! Answers are parsed with `roxmltree` and copied into [`Element`]s, which keep what the vSphere
//! API carries: local names (SOAP answers mix prefixes, and vcsim spells `xsi:type` with its
//! own prefix), the `xsi:type` attribute, a managed object reference's plain `type` attribute,
//! and text.

/// The XML Schema instance namespace, of `xsi:type`.
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// `s` with `&`, `<`, `>`, `"` and `'` escaped, for element text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// An element of an answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name, without prefix.
    pub name: String,
    /// The `xsi:type` attribute (`VirtualDisk`, `xsd:string`), when present.
    pub xsi_type: Option<String>,
    /// The plain `type` attribute of a managed object reference (`VirtualMachine`).
    pub ref_type: Option<String>,
    /// Text directly inside the element (concatenated), not trimmed.
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// Parses a document and returns its root element.
    pub fn parse(text: &str) -> Result<Element, String> {
        let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
        Ok(Self::from_node(doc.root_element()))
    }

    fn from_node(node: roxmltree::Node<'_, '_>) -> Element {
        let mut element = Element {
            name: node.tag_name().name().to_owned(),
            xsi_type: node.attribute((XSI, "type")).map(str::to_owned),
            ref_type: node
                .attributes()
                .find(|a| a.namespace().is_none() && a.name() == "type")
                .map(|a| a.value().to_owned()),
            ..Element::default()
        };
        for child in node.children() {
            if child.is_element() {
                element.children.push(Self::from_node(child));
            } else if child.is_text() {
                element.text.push_str(child.text().unwrap_or_default());
            }
        }
        element
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at the path of child names `path` (e.g. `["deviceInfo", "label"]`).
    pub fn at(&self, path: &[&str]) -> Option<&Element> {
        path.iter().try_fold(self, |e, name| e.child(name))
    }

    /// The trimmed text of the element at `path`, when there is one.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        self.at(path).map(|e| e.text.trim())
    }

    /// The trimmed text of the element itself.
    pub fn value(&self) -> &str {
        self.text.trim()
    }

    /// The first descendant (or itself) named `name`, depth first.
    pub fn find(&self, name: &str) -> Option<&Element> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_the_five_entities() {
        assert_eq!(escape(r#"a&b<c>d"e'f"#), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(escape("plain [ds1] vm/x.vmdk"), "plain [ds1] vm/x.vmdk");
    }

    #[test]
    fn xsi_type_is_found_under_any_prefix() {
        let vcsim = r#"<val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"
            XMLSchema-instance:type="xsd:string">x</val>"#;
        let vcenter = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
            xsi:type="ManagedObjectReference" type="HostSystem">host-9</val>"#;
        let a = Element::parse(vcsim).unwrap();
        assert_eq!(a.xsi_type.as_deref(), Some("xsd:string"));
        assert_eq!(a.ref_type, None);
        let b = Element::parse(vcenter).unwrap();
        assert_eq!(b.xsi_type.as_deref(), Some("ManagedObjectReference"));
        assert_eq!(b.ref_type.as_deref(), Some("HostSystem"));
        assert_eq!(b.value(), "host-9");
    }

    #[test]
    fn paths_and_entities() {
        let e = Element::parse("<a><b><c> x &amp; y </c></b><b><c>second</c></b><d/></a>").unwrap();
        assert_eq!(e.text_at(&["b", "c"]), Some("x & y"));
        assert_eq!(e.children_named("b").count(), 2);
        assert_eq!(e.text_at(&["d"]), Some(""));
        assert!(e.at(&["b", "nope"]).is_none());
        assert_eq!(e.find("c").map(Element::value), Some("x & y"));
    }
}
