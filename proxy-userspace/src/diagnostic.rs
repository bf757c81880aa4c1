//! Diagnostics: what loading, analysis and compilation say about a config set. Each has a stable
//! code (Istio's `IST####` where istioctl has one, `NP####` for ours), a severity, the object and
//! where it was read from. A set with any `Error` is never served.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// How bad a diagnostic is. Only `Error` rejects a config set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    /// Worth knowing, nothing breaks.
    Info,
    /// Traffic will likely not behave as intended.
    Warning,
    /// The set is rejected.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Error => "ERROR",
        })
    }
}

/// Where an object (or a document that failed to parse) was read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Source {
    /// File path as given (or `kubernetes` for API objects).
    pub file: PathBuf,
    /// 1-based line of the document or field.
    pub line: usize,
    /// 0-based document index in the file.
    pub document: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// `kind/namespace/name` of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    /// `VirtualService`, `DestinationRule`, ...
    pub kind: String,
    /// Namespace (`default` when the object has none).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// A stable diagnostic code and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Code {
    /// `IST0101`, `NP0001`, ...
    pub id: &'static str,
    /// `ReferencedResourceNotFound`, ...
    pub name: &'static str,
}

/// Every code this project emits, in one place so they stay stable.
pub mod codes {
    use super::Code;

    /// A document that is not valid YAML or does not fit the Istio schema.
    pub const PARSE_ERROR: Code = Code {
        id: "NP0001",
        name: "ParseError",
    };
    /// An object of a kind nodeproxy does not use (Deployment, ...), skipped.
    pub const SKIPPED_KIND: Code = Code {
        id: "NP0002",
        name: "SkippedKind",
    };
    /// A field nodeproxy accepts but does not implement.
    pub const UNSUPPORTED_FIELD: Code = Code {
        id: "NP0003",
        name: "UnsupportedField",
    };
    /// A file or directory that cannot be read.
    pub const READ_ERROR: Code = Code {
        id: "NP0004",
        name: "ReadError",
    };
    /// Two objects with the same kind, namespace and name.
    pub const DUPLICATE_OBJECT: Code = Code {
        id: "NP0005",
        name: "DuplicateObject",
    };
    /// A watched file that declared objects and is now empty (truncated, or replaced by an
    /// empty file): the reload is refused; deleting the file is how its objects are removed.
    pub const EMPTIED_FILE: Code = Code {
        id: "NP0006",
        name: "FileEmptied",
    };
    /// A configuration file with no objects in it.
    pub const EMPTY_FILE: Code = Code {
        id: "NP0007",
        name: "EmptyFile",
    };
    /// attempts x perTryTimeout exceeds the route timeout.
    pub const RETRY_EXCEEDS_TIMEOUT: Code = Code {
        id: "NP1001",
        name: "RetriesExceedTimeout",
    };
    /// A ServiceEntry endpoint on the node itself (loopback, link-local), which the proxy
    /// refuses to dial for captured pods.
    pub const NODE_LOCAL_ENDPOINT: Code = Code {
        id: "NP1003",
        name: "NodeLocalEndpoint",
    };
    /// A delegated rule left out: its delegate is missing or not exported to the root's
    /// namespace, delegates again, or its matches are outside the root rule's.
    pub const DELEGATE_DROPPED: Code = Code {
        id: "NP1004",
        name: "DelegateRuleDropped",
    };
    /// A fault without a percentage never fires.
    pub const FAULT_NEVER_FIRES: Code = Code {
        id: "NP1002",
        name: "FaultNeverFires",
    };
    /// A referenced host, subset, gateway or port does not exist.
    pub const NOT_FOUND: Code = Code {
        id: "IST0101",
        name: "ReferencedResourceNotFound",
    };
    /// A field value Istio's validation rejects.
    pub const SCHEMA: Code = Code {
        id: "IST0106",
        name: "SchemaValidationError",
    };
    /// Two mesh VirtualServices for one host.
    pub const CONFLICTING_HOSTS: Code = Code {
        id: "IST0109",
        name: "ConflictingMeshGatewayVirtualServiceHosts",
    };
    /// A destination without port on a multi-port service.
    pub const PORT_REQUIRED: Code = Code {
        id: "IST0112",
        name: "VirtualServiceDestinationPortSelectorRequired",
    };
    /// A rule after a catch-all.
    pub const UNREACHABLE_RULE: Code = Code {
        id: "IST0130",
        name: "VirtualServiceUnreachableRule",
    };
    /// A match block identical to an earlier one.
    pub const INEFFECTIVE_MATCH: Code = Code {
        id: "IST0131",
        name: "VirtualServiceIneffectiveMatch",
    };
    /// VS hosts outside the Gateway's server hosts.
    pub const HOST_NOT_IN_GATEWAY: Code = Code {
        id: "IST0132",
        name: "VirtualServiceHostNotFoundInGateway",
    };
    /// Validation warnings.
    pub const SCHEMA_WARNING: Code = Code {
        id: "IST0133",
        name: "SchemaWarning",
    };
    /// A TCP ServiceEntry port without addresses.
    pub const ADDRESSES_REQUIRED: Code = Code {
        id: "IST0134",
        name: "ServiceEntryAddressesRequired",
    };
    /// A subset whose labels select no endpoint.
    pub const SUBSET_SELECTS_NOTHING: Code = Code {
        id: "IST0173",
        name: "DestinationRuleSubsetNotSelectPods",
    };
    /// A DestinationRule for a host not in the registry.
    pub const UNKNOWN_DR_HOST: Code = Code {
        id: "IST0174",
        name: "UnknownDestinationRuleHost",
    };
    /// A deprecated field.
    pub const DEPRECATED: Code = Code {
        id: "IST0002",
        name: "Deprecated",
    };
    /// A Service port whose name and appProtocol declare no protocol.
    pub const PORT_NAME_CONVENTION: Code = Code {
        id: "IST0118",
        name: "PortNameIsNotUnderNamingConvention",
    };
    /// DestinationRule TLS (SIMPLE/MUTUAL) without caCertificates.
    pub const NO_SERVER_CERT_VERIFICATION_DR: Code = Code {
        id: "IST0128",
        name: "NoServerCertificateVerificationDestinationLevel",
    };
    /// Port-level DestinationRule TLS (SIMPLE/MUTUAL) without caCertificates.
    pub const NO_SERVER_CERT_VERIFICATION_PORT: Code = Code {
        id: "IST0129",
        name: "NoServerCertificateVerificationPortLevel",
    };
    /// Two gateways present the same certificate.
    pub const GATEWAY_DUPLICATE_CERTIFICATE: Code = Code {
        id: "IST0138",
        name: "GatewayDuplicateCertificate",
    };
    /// Two gateways of one selector claim a host on one port.
    pub const CONFLICTING_GATEWAYS: Code = Code {
        id: "IST0145",
        name: "ConflictingGateways",
    };
    /// An ExternalName Service port named so that its traffic is treated as plain TCP.
    pub const EXTERNAL_NAME_PORT_NAME: Code = Code {
        id: "IST0150",
        name: "ExternalNameServiceTypeInvalidPortName",
    };
    /// One ServiceEntry host and port declared with two protocols.
    pub const CONFLICTING_PROTOCOL: Code = Code {
        id: "IST0177",
        name: "ConflictingServiceEntryProtocol",
    };
}

/// One finding about a config set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    /// Stable code.
    pub code: Code,
    /// Severity.
    pub severity: Severity,
    /// The object concerned, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// Where it was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Field path inside the object (`spec.http[0].route[1].destination.subset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Human-readable message.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic with no object or source yet.
    pub fn new(code: Code, severity: Severity, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            severity,
            object: None,
            source: None,
            field: None,
            message: message.into(),
        }
    }

    /// Attach the object and its source.
    pub fn on(mut self, object: ObjectRef, source: Source) -> Self {
        self.object = Some(object);
        self.source = Some(source);
        self
    }

    /// Attach a field path.
    pub fn at(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Is this an error (rejects the set)?
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `path:line: SEVERITY CODE kind/ns/name: message (at field)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(src) = &self.source {
            write!(f, "{src}: ")?;
        }
        write!(f, "{} {}", self.severity, self.code.id)?;
        if let Some(obj) = &self.object {
            write!(f, " {obj}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (at {field})")?;
        }
        Ok(())
    }
}

/// Does any diagnostic reject the set?
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(Diagnostic::is_error)
}
