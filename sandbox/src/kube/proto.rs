//! A minimal decoder for the Kubernetes protobuf envelope, for the request bodies that
//! kubectl's typed clients send as protobuf (`kubectl create namespace|configmap|secret|
//! serviceaccount|token`). Responses are always JSON, which those clients also accept.

use base64::Engine;
use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum F {
    Str(&'static str),
    Int(&'static str),
    Bool(&'static str),
    Msg(&'static str, &'static [(u32, F)]),
    RepStr(&'static str),
    RepMsg(&'static str, &'static [(u32, F)]),
    MapStr(&'static str),
    MapBytes(&'static str),
    /// `intstr.IntOrString` {type=1, intVal=2, strVal=3}.
    IntOrStr(&'static str),
    /// `map<string, resource.Quantity>` (Quantity {string=1}).
    MapQty(&'static str),
    /// `bytes`: base64 in JSON.
    Bytes(&'static str),
}

const OWNER_REF: &[(u32, F)] = &[
    (1, F::Str("kind")),
    (3, F::Str("name")),
    (4, F::Str("uid")),
    (5, F::Str("apiVersion")),
    (6, F::Bool("controller")),
    (7, F::Bool("blockOwnerDeletion")),
];

const OBJECT_META: &[(u32, F)] = &[
    (1, F::Str("name")),
    (2, F::Str("generateName")),
    (3, F::Str("namespace")),
    (5, F::Str("uid")),
    (6, F::Str("resourceVersion")),
    (7, F::Int("generation")),
    (11, F::MapStr("labels")),
    (12, F::MapStr("annotations")),
    (13, F::RepMsg("ownerReferences", OWNER_REF)),
    (14, F::RepStr("finalizers")),
];

const OBJECT_REF: &[(u32, F)] = &[
    (1, F::Str("kind")),
    (2, F::Str("namespace")),
    (3, F::Str("name")),
    (4, F::Str("uid")),
    (5, F::Str("apiVersion")),
];
const LOCAL_REF: &[(u32, F)] = &[(1, F::Str("name"))];

const NAMESPACE: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::Msg("spec", &[(1, F::RepStr("finalizers"))])),
];
const CONFIGMAP: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::MapStr("data")),
    (3, F::MapBytes("binaryData")),
    (4, F::Bool("immutable")),
];
const SECRET: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::MapBytes("data")),
    (3, F::Str("type")),
    (4, F::MapStr("stringData")),
    (5, F::Bool("immutable")),
];
const SERVICE_ACCOUNT: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::RepMsg("secrets", OBJECT_REF)),
    (3, F::RepMsg("imagePullSecrets", LOCAL_REF)),
    (4, F::Bool("automountServiceAccountToken")),
];
/// `certificates.k8s.io/v1` CSR (`kubectl certificate approve|deny` send it whole); the
/// conditions' timestamps are not decoded.
const CSR: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg(
            "spec",
            &[
                (1, F::Bytes("request")),
                (2, F::Str("username")),
                (3, F::Str("uid")),
                (4, F::RepStr("groups")),
                (5, F::RepStr("usages")),
                (7, F::Str("signerName")),
                (8, F::Int("expirationSeconds")),
            ],
        ),
    ),
    (
        3,
        F::Msg(
            "status",
            &[
                (
                    1,
                    F::RepMsg(
                        "conditions",
                        &[
                            (1, F::Str("type")),
                            (2, F::Str("reason")),
                            (3, F::Str("message")),
                            (6, F::Str("status")),
                        ],
                    ),
                ),
                (2, F::Bytes("certificate")),
            ],
        ),
    ),
];
const TOKEN_REQUEST: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg("spec", &[(1, F::RepStr("audiences")), (4, F::Int("expirationSeconds"))]),
    ),
];

const POLICY_RULE: &[(u32, F)] = &[
    (1, F::RepStr("verbs")),
    (2, F::RepStr("apiGroups")),
    (3, F::RepStr("resources")),
    (4, F::RepStr("resourceNames")),
    (5, F::RepStr("nonResourceURLs")),
];
const ROLE: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::RepMsg("rules", POLICY_RULE)),
];
const SUBJECT: &[(u32, F)] = &[
    (1, F::Str("kind")),
    (2, F::Str("apiGroup")),
    (3, F::Str("name")),
    (4, F::Str("namespace")),
];
const ROLE_REF: &[(u32, F)] = &[(1, F::Str("apiGroup")), (2, F::Str("kind")), (3, F::Str("name"))];
const BINDING: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::RepMsg("subjects", SUBJECT)),
    (3, F::Msg("roleRef", ROLE_REF)),
];

const RESOURCE_ATTRS: &[(u32, F)] = &[
    (1, F::Str("namespace")),
    (2, F::Str("verb")),
    (3, F::Str("group")),
    (4, F::Str("version")),
    (5, F::Str("resource")),
    (6, F::Str("subresource")),
    (7, F::Str("name")),
];
const NON_RESOURCE_ATTRS: &[(u32, F)] = &[(1, F::Str("path")), (2, F::Str("verb"))];
const SSAR: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg(
            "spec",
            &[
                (1, F::Msg("resourceAttributes", RESOURCE_ATTRS)),
                (2, F::Msg("nonResourceAttributes", NON_RESOURCE_ATTRS)),
            ],
        ),
    ),
];

const LABEL_SELECTOR: &[(u32, F)] = &[
    (1, F::MapStr("matchLabels")),
    (
        2,
        F::RepMsg(
            "matchExpressions",
            &[(1, F::Str("key")), (2, F::Str("operator")), (3, F::RepStr("values"))],
        ),
    ),
];
const CONTAINER_PORT: &[(u32, F)] = &[
    (1, F::Str("name")),
    (2, F::Int("hostPort")),
    (3, F::Int("containerPort")),
    (4, F::Str("protocol")),
    (5, F::Str("hostIP")),
];
const CONTAINER: &[(u32, F)] = &[
    (1, F::Str("name")),
    (2, F::Str("image")),
    (3, F::RepStr("command")),
    (4, F::RepStr("args")),
    (5, F::Str("workingDir")),
    (6, F::RepMsg("ports", CONTAINER_PORT)),
    (7, F::RepMsg("env", &[(1, F::Str("name")), (2, F::Str("value"))])),
    (
        8,
        F::Msg("resources", &[(1, F::MapQty("limits")), (2, F::MapQty("requests"))]),
    ),
    (
        9,
        F::RepMsg(
            "volumeMounts",
            &[
                (1, F::Str("name")),
                (2, F::Bool("readOnly")),
                (3, F::Str("mountPath")),
                (4, F::Str("subPath")),
            ],
        ),
    ),
    (13, F::Str("terminationMessagePath")),
    (14, F::Str("imagePullPolicy")),
    (20, F::Str("terminationMessagePolicy")),
];
const TOLERATION: &[(u32, F)] = &[
    (1, F::Str("key")),
    (2, F::Str("operator")),
    (3, F::Str("value")),
    (4, F::Str("effect")),
    (5, F::Int("tolerationSeconds")),
];
const POD_SPEC: &[(u32, F)] = &[
    (2, F::RepMsg("containers", CONTAINER)),
    (3, F::Str("restartPolicy")),
    (4, F::Int("terminationGracePeriodSeconds")),
    (6, F::Str("dnsPolicy")),
    (7, F::MapStr("nodeSelector")),
    (8, F::Str("serviceAccountName")),
    (10, F::Str("nodeName")),
    (11, F::Bool("hostNetwork")),
    (15, F::RepMsg("imagePullSecrets", LOCAL_REF)),
    (19, F::Str("schedulerName")),
    (20, F::RepMsg("initContainers", CONTAINER)),
    (22, F::RepMsg("tolerations", TOLERATION)),
    (24, F::Str("priorityClassName")),
];
const POD_TEMPLATE: &[(u32, F)] = &[(1, F::Msg("metadata", OBJECT_META)), (2, F::Msg("spec", POD_SPEC))];
const DEPLOYMENT: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg(
            "spec",
            &[
                (1, F::Int("replicas")),
                (2, F::Msg("selector", LABEL_SELECTOR)),
                (3, F::Msg("template", POD_TEMPLATE)),
                (
                    4,
                    F::Msg(
                        "strategy",
                        &[
                            (1, F::Str("type")),
                            (
                                2,
                                F::Msg(
                                    "rollingUpdate",
                                    &[(1, F::IntOrStr("maxUnavailable")), (2, F::IntOrStr("maxSurge"))],
                                ),
                            ),
                        ],
                    ),
                ),
                (5, F::Int("minReadySeconds")),
                (6, F::Int("revisionHistoryLimit")),
                (7, F::Bool("paused")),
                (9, F::Int("progressDeadlineSeconds")),
            ],
        ),
    ),
];
const SERVICE_PORT: &[(u32, F)] = &[
    (1, F::Str("name")),
    (2, F::Str("protocol")),
    (3, F::Int("port")),
    (4, F::IntOrStr("targetPort")),
    (5, F::Int("nodePort")),
    (6, F::Str("appProtocol")),
];
const SERVICE: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg(
            "spec",
            &[
                (1, F::RepMsg("ports", SERVICE_PORT)),
                (2, F::MapStr("selector")),
                (3, F::Str("clusterIP")),
                (4, F::Str("type")),
                (5, F::RepStr("externalIPs")),
                (7, F::Str("sessionAffinity")),
                (8, F::Str("loadBalancerIP")),
                (9, F::RepStr("loadBalancerSourceRanges")),
                (10, F::Str("externalName")),
                (11, F::Str("externalTrafficPolicy")),
                (12, F::Int("healthCheckNodePort")),
                (13, F::Bool("publishNotReadyAddresses")),
                (17, F::Str("ipFamilyPolicy")),
                (18, F::RepStr("clusterIPs")),
                (19, F::RepStr("ipFamilies")),
                (20, F::Bool("allocateLoadBalancerNodePorts")),
                (21, F::Str("loadBalancerClass")),
                (22, F::Str("internalTrafficPolicy")),
            ],
        ),
    ),
];
const PDB: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (
        2,
        F::Msg(
            "spec",
            &[
                (1, F::IntOrStr("minAvailable")),
                (2, F::Msg("selector", LABEL_SELECTOR)),
                (3, F::IntOrStr("maxUnavailable")),
                (4, F::Str("unhealthyPodEvictionPolicy")),
            ],
        ),
    ),
];
const PRIORITY_CLASS: &[(u32, F)] = &[
    (1, F::Msg("metadata", OBJECT_META)),
    (2, F::Int("value")),
    (3, F::Bool("globalDefault")),
    (4, F::Str("description")),
    (5, F::Str("preemptionPolicy")),
];

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i).ok_or("truncated varint")?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        let end = self
            .i
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }
    /// Next (field number, wire type) and the field's value.
    fn field(&mut self) -> Result<(u32, Raw<'a>), String> {
        let key = self.varint()?;
        let (num, wt) = ((key >> 3) as u32, key & 7);
        let raw = match wt {
            0 => Raw::Varint(self.varint()?),
            1 => {
                self.i += 8;
                Raw::Skip
            }
            2 => Raw::Bytes(self.bytes()?),
            5 => {
                self.i += 4;
                Raw::Skip
            }
            _ => return Err(format!("unsupported wire type {wt}")),
        };
        if self.i > self.b.len() {
            return Err("truncated field".into());
        }
        Ok((num, raw))
    }
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
}

enum Raw<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skip,
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8".to_string())
}

fn decode(b: &[u8], schema: &[(u32, F)]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut r = Reader { b, i: 0 };
    while !r.done() {
        let (num, raw) = r.field()?;
        let Some((_, f)) = schema.iter().find(|(n, _)| *n == num) else {
            continue;
        };
        match (*f, raw) {
            (F::Str(k), Raw::Bytes(x)) => {
                // Go writes unset strings as ""; JSON would omit them.
                if !x.is_empty() {
                    out.insert(k.into(), json!(text(x)?));
                }
            }
            (F::Bytes(k), Raw::Bytes(x)) => {
                if !x.is_empty() {
                    out.insert(k.into(), json!(base64::engine::general_purpose::STANDARD.encode(x)));
                }
            }
            (F::Int(k), Raw::Varint(v)) => {
                // int32 fields carry negatives sign-extended to 64 bits.
                out.insert(k.into(), json!(v as i64));
            }
            (F::IntOrStr(k), Raw::Bytes(x)) => {
                let mut r = Reader { b: x, i: 0 };
                let (mut typ, mut int, mut string) = (0u64, 0i64, String::new());
                while !r.done() {
                    match r.field()? {
                        (1, Raw::Varint(t)) => typ = t,
                        (2, Raw::Varint(n)) => int = n as i32 as i64,
                        (3, Raw::Bytes(b)) => string = text(b)?,
                        _ => {}
                    }
                }
                out.insert(k.into(), if typ == 1 { json!(string) } else { json!(int) });
            }
            (F::MapQty(k), Raw::Bytes(x)) => {
                let mut er = Reader { b: x, i: 0 };
                let (mut key, mut qty) = (String::new(), String::new());
                while !er.done() {
                    match er.field()? {
                        (1, Raw::Bytes(kb)) => key = text(kb)?,
                        (2, Raw::Bytes(vb)) => {
                            let mut q = Reader { b: vb, i: 0 };
                            while !q.done() {
                                if let (1, Raw::Bytes(s)) = q.field()? {
                                    qty = text(s)?;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let e = out.entry(k).or_insert_with(|| json!({}));
                if let Some(m) = e.as_object_mut() {
                    m.insert(key, json!(qty));
                }
            }
            (F::Bool(k), Raw::Varint(v)) => {
                out.insert(k.into(), json!(v != 0));
            }
            (F::Msg(k, s), Raw::Bytes(x)) => {
                out.insert(k.into(), decode(x, s)?);
            }
            (F::RepStr(k), Raw::Bytes(x)) => {
                let e = out.entry(k).or_insert_with(|| json!([]));
                if let Some(a) = e.as_array_mut() {
                    a.push(json!(text(x)?));
                }
            }
            (F::RepMsg(k, s), Raw::Bytes(x)) => {
                let v = decode(x, s)?;
                let e = out.entry(k).or_insert_with(|| json!([]));
                if let Some(a) = e.as_array_mut() {
                    a.push(v);
                }
            }
            (F::MapStr(k) | F::MapBytes(k), Raw::Bytes(x)) => {
                let mut er = Reader { b: x, i: 0 };
                let (mut key, mut val) = (String::new(), Vec::new());
                while !er.done() {
                    match er.field()? {
                        (1, Raw::Bytes(kb)) => key = text(kb)?,
                        (2, Raw::Bytes(vb)) => val = vb.to_vec(),
                        _ => {}
                    }
                }
                let v = if matches!(f, F::MapBytes(_)) {
                    json!(base64::engine::general_purpose::STANDARD.encode(&val))
                } else {
                    json!(text(&val)?)
                };
                let e = out.entry(k).or_insert_with(|| json!({}));
                if let Some(m) = e.as_object_mut() {
                    m.insert(key, v);
                }
            }
            _ => return Err(format!("field {num} has an unexpected wire type")),
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body (`k8s\0` + `runtime.Unknown`) into JSON.
pub fn decode_object(body: &[u8]) -> Result<Value, String> {
    let rest = body.strip_prefix(MAGIC).ok_or("missing protobuf magic")?;
    let mut r = Reader { b: rest, i: 0 };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while !r.done() {
        match r.field()? {
            (1, Raw::Bytes(tm)) => {
                let mut t = Reader { b: tm, i: 0 };
                while !t.done() {
                    match t.field()? {
                        (1, Raw::Bytes(x)) => api_version = text(x)?,
                        (2, Raw::Bytes(x)) => kind = text(x)?,
                        _ => {}
                    }
                }
            }
            (2, Raw::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIGMAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("certificates.k8s.io/v1", "CertificateSigningRequest") => CSR,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => SSAR,
        ("apps/v1", "Deployment") => DEPLOYMENT,
        ("v1", "Service") => SERVICE,
        ("policy/v1", "PodDisruptionBudget") => PDB,
        ("scheduling.k8s.io/v1", "PriorityClass") => PRIORITY_CLASS,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        _ => {
            return Err(format!(
                "protobuf is not supported for {api_version} {kind}; send application/json"
            ));
        }
    };
    let mut v = decode(raw, schema)?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn namespace_and_configmap() {
        let meta = [
            field(1, b"team-a"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let ns = field(1, &meta);
        let type_meta = [field(1, b"v1"), field(2, b"Namespace")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &ns)].concat();
        let v = decode_object(&body).unwrap();
        assert_eq!(v["metadata"]["name"], "team-a");
        assert_eq!(v["metadata"]["labels"]["a"], "b");
        assert_eq!(v["kind"], "Namespace");
        let cm = [
            field(1, &field(1, b"c")),
            field(3, &[field(1, b"k"), field(2, b"\x00\x01")].concat()),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &cm)].concat();
        let v = decode_object(&body).unwrap();
        assert_eq!(v["binaryData"]["k"], "AAE=");
        assert!(decode_object(b"k8s\0\x0a\xff").is_err());
        assert!(decode_object(b"nope").is_err());
    }
}
