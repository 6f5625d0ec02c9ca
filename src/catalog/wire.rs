//! The catalog objects as they are written: serde shapes of ModuleTemplate,
//! ModuleReleaseMeta and Manifest (and the OCM component descriptor a ModuleTemplate embeds),
//! deserialized from the JSON both sources hand over (`kubectl get -o json` shape). Secrets
//! are `k8s-openapi`'s own type (see [`super::model`]).
//!
//! Lenient by construction, because these CRDs span every Lifecycle Manager era and
//! `modulectl` keeps adding fields: unknown fields are ignored, every field is optional, and a
//! field of the wrong shape is [`Field::Malformed`] instead of failing the whole object. What
//! decides credentials (selectors, `baseUrl`s, repositories) is checked by hand in
//! [`super::model`]; selector values stay raw JSON for [`super::selector`] to judge.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::Value;

/// One field as written: absent (or `null`), of the expected shape, or of another shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Field<T> {
    #[default]
    Absent,
    Valid(T),
    Malformed,
}

impl<T> Field<T> {
    /// The value when it has the expected shape; absent and malformed are both `None`.
    pub(super) fn ok(self) -> Option<T> {
        match self {
            Field::Valid(v) => Some(v),
            Field::Absent | Field::Malformed => None,
        }
    }

    pub(super) fn as_ref(&self) -> Field<&T> {
        match self {
            Field::Valid(v) => Field::Valid(v),
            Field::Absent => Field::Absent,
            Field::Malformed => Field::Malformed,
        }
    }

    /// Written at all, whatever its shape.
    pub(super) fn is_present(&self) -> bool {
        !matches!(self, Field::Absent)
    }
}

impl Field<String> {
    /// The string, when it is one and not empty.
    pub(super) fn non_empty(&self) -> Option<&str> {
        match self {
            Field::Valid(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Field::Valid(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => Field::Absent,
            v => T::deserialize(v).map_or(Field::Malformed, Field::Valid),
        })
    }
}

/// A Kubernetes `RawExtension`-like field: an object, or a string holding a JSON or YAML
/// object. Anything else counts as absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Embedded<T>(pub(super) Option<T>);

impl<T> Default for Embedded<T> {
    fn default() -> Self {
        Embedded(None)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Embedded<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = match Value::deserialize(d)? {
            v @ Value::Object(_) => Some(v),
            Value::String(s) => serde_json::from_str(&s)
                .ok()
                .or_else(|| serde_yaml::from_str::<Value>(&s).ok())
                .filter(Value::is_object),
            _ => None,
        };
        Ok(Embedded(object.and_then(|v| T::deserialize(v).ok())))
    }
}

/// What every object is dispatched and named by.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct Head {
    pub(super) kind: Field<String>,
    pub(super) api_version: Field<String>,
    pub(super) metadata: Field<Metadata>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Metadata {
    pub(super) name: Field<String>,
    pub(super) namespace: Field<String>,
    pub(super) annotations: Field<BTreeMap<String, Field<String>>>,
}

/// A Kyma CRD object: metadata and a `spec` of type `S`.
#[derive(Debug, Deserialize)]
pub(super) struct Kyma<S> {
    #[serde(default)]
    pub(super) metadata: Field<Metadata>,
    #[serde(default = "Option::default")]
    pub(super) spec: Option<S>,
}

/// The fields of a ModuleTemplate's `spec` the catalog reads; everything else (`info`,
/// `manager`, `associatedResources`, `data`, fields of future LM versions) is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct TemplateSpec {
    pub(super) module_name: Option<String>,
    pub(super) version: Option<String>,
    /// `descriptor: {}` (modulectl since 2025-10), absent, or a full OCM descriptor.
    pub(super) descriptor: Embedded<Descriptor>,
}

/// An OCM component descriptor: v2 (`component`) or v3alpha1 (`metadata` + `spec`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct Descriptor {
    pub(super) component: Field<ComponentV2>,
    pub(super) metadata: Field<ComponentMeta>,
    pub(super) repository_contexts: Field<Vec<Field<RepositoryContext>>>,
    pub(super) spec: Field<ComponentSpec>,
}

/// OCM v2 `component`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct ComponentV2 {
    pub(super) name: Field<String>,
    pub(super) version: Field<String>,
    pub(super) labels: Field<Vec<Field<Label>>>,
    pub(super) repository_contexts: Field<Vec<Field<RepositoryContext>>>,
    pub(super) resources: Field<Vec<Field<Resource>>>,
}

/// OCM v3alpha1 `metadata`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ComponentMeta {
    pub(super) name: Field<String>,
    pub(super) version: Field<String>,
    pub(super) labels: Field<Vec<Field<Label>>>,
}

/// OCM v3alpha1 `spec`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ComponentSpec {
    pub(super) resources: Field<Vec<Field<Resource>>>,
}

/// An OCM label; its value may be any JSON (a selector is an object or a JSON string).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Label {
    pub(super) name: Field<String>,
    pub(super) value: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RepositoryContext {
    #[serde(rename = "type")]
    pub(super) type_: Field<String>,
    pub(super) base_url: Field<String>,
    pub(super) sub_path: Field<String>,
    pub(super) component_name_mapping: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Resource {
    pub(super) name: Field<String>,
    pub(super) labels: Field<Vec<Field<Label>>>,
    pub(super) access: Field<Access>,
}

/// A resource's `access`: `localOciBlob`/`localBlob` (digest or local reference) or
/// `ociArtifact`/`ociImage`/`ociRegistry` (image reference).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct Access {
    #[serde(rename = "type")]
    pub(super) type_: Field<String>,
    pub(super) digest: Field<String>,
    pub(super) local_reference: Field<String>,
    pub(super) media_type: Field<String>,
    pub(super) image_reference: Field<String>,
}

/// `spec` of a ModuleReleaseMeta as LM defines it (`api/v1beta2/modulereleasemeta_types.go`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct ReleaseMetaSpec {
    pub(super) module_name: Option<String>,
    pub(super) ocm_component_name: Option<String>,
    pub(super) channels: Option<Vec<ChannelVersion>>,
    pub(super) mandatory: Option<Mandatory>,
    pub(super) beta: Option<bool>,
    pub(super) internal: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ChannelVersion {
    pub(super) channel: Option<String>,
    pub(super) version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Mandatory {
    pub(super) version: Option<String>,
}

/// `spec` of a Manifest: the image specs that may carry a `credSecretSelector`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ManifestSpec {
    pub(super) install: Field<Install>,
    pub(super) config: Embedded<ImageSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Install {
    pub(super) source: Embedded<ImageSpec>,
}

/// LM's `ImageSpec`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct ImageSpec {
    pub(super) repo: Field<String>,
    pub(super) name: Field<String>,
    #[serde(rename = "ref")]
    pub(super) reference: Field<String>,
    /// A `metav1.LabelSelector`, judged by [`super::selector::Selector::from_label_selector`].
    pub(super) cred_secret_selector: Value,
}
