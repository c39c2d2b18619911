//! Port claims, the port table, instances and certificates, and loading them at start.
use std::net::SocketAddr;

use super::{ControlPlane, internal};
use crate::certs::{self, StoredCertificate};
use crate::error::{ApiError, ErrorCode};
use crate::model::{
    Certificate, CertificateSpec, Instance, InstanceSpec, Mode, PortClaim, PortClaimSpec,
    PortEntry, PortOwnerKind, validate_name,
};
use crate::store::Kind;

fn check_port_number(port: u16) -> Result<(), ApiError> {
    if port == 0 {
        return Err(ApiError::bad_request("port: must be 1-65535"));
    }
    Ok(())
}

impl ControlPlane {
    /// Loads every record (instances, certificates, claims, then ingresses) and binds the
    /// listeners; whatever cannot be loaded or applied is reported and left on disk.
    pub async fn load(&self) {
        self.load_instances();
        self.load_certificates();
        self.load_claims().await;
        self.load_ingresses().await;
        self.inherited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    fn load_instances(&self) {
        let (records, failed) = self.store.load_all::<Instance>(Kind::Instance);
        failed.into_iter().for_each(|f| self.report(f));
        for (key, inst) in records {
            let problem = if inst.name != key {
                Some(format!(
                    "record name {:?} does not match its file name",
                    inst.name
                ))
            } else {
                validate_name("name", &inst.name).err().map(|e| e.message)
            };
            match problem {
                Some(reason) => self.report(
                    self.store
                        .failure(&self.store.path(Kind::Instance, &key), reason),
                ),
                None => {
                    self.shared.instances.insert(&inst.name, inst.address);
                }
            }
        }
    }

    fn load_certificates(&self) {
        let (records, failed) = self.store.load_all::<StoredCertificate>(Kind::Certificate);
        failed.into_iter().for_each(|f| self.report(f));
        for (key, rec) in records {
            let path = self.store.path(Kind::Certificate, &key);
            if rec.name != key {
                let reason = format!("record name {:?} does not match its file name", rec.name);
                self.report(self.store.failure(&path, reason));
                continue;
            }
            match certs::load(&rec) {
                Ok(c) => self.shared.certs.insert(c),
                Err(e) => self.report(
                    self.store
                        .failure(&path, format!("unusable certificate: {e}")),
                ),
            }
        }
    }

    async fn load_claims(&self) {
        let (records, failed) = self.store.load_all::<PortClaim>(Kind::PortClaim);
        failed.into_iter().for_each(|f| self.report(f));
        let mut state = self.state.lock().await;
        for (key, claim) in records {
            let path = self.store.path(Kind::PortClaim, &key);
            let problem = if claim.port.to_string() != key {
                Some(format!(
                    "record port {} does not match its file name",
                    claim.port
                ))
            } else {
                self.check_port(&state, claim.port, None, "port")
                    .err()
                    .map(|e| format!("cannot apply: {}", e.message))
            };
            match problem {
                Some(reason) => self.report(self.store.failure(&path, reason)),
                None => {
                    state.claims.insert(claim.port, claim.owner);
                }
            }
        }
    }

    /// Claims a port for an external owner; `Ok((claim, true))` when newly created.
    pub async fn put_claim(
        &self,
        port: u16,
        spec: PortClaimSpec,
    ) -> Result<(PortClaim, bool), ApiError> {
        check_port_number(port)?;
        validate_name("owner", &spec.owner)?;
        let mut state = self.state.lock().await;
        if let Some(owner) = state.claims.get(&port) {
            if *owner == spec.owner {
                return Ok((
                    PortClaim {
                        port,
                        owner: spec.owner,
                    },
                    false,
                ));
            }
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("port: port {port} is already claimed by {owner:?}"),
            ));
        }
        self.check_port(&state, port, None, "port")?;
        let claim = PortClaim {
            port,
            owner: spec.owner,
        };
        self.store
            .put(Kind::PortClaim, &port.to_string(), &claim)
            .map_err(|e| internal("writing port claim", e))?;
        state.claims.insert(port, claim.owner.clone());
        tracing::info!(port, owner = %claim.owner, "port claimed");
        Ok((claim, true))
    }

    /// Releases an external claim.
    pub async fn delete_claim(&self, port: u16) -> Result<(), ApiError> {
        let mut state = self.state.lock().await;
        if !state.claims.contains_key(&port) {
            return Err(ApiError::not_found(format!(
                "port claim {port} does not exist"
            )));
        }
        self.store
            .delete(Kind::PortClaim, &port.to_string())
            .map_err(|e| internal("removing port claim", e))?;
        state.claims.remove(&port);
        tracing::info!(port, "port claim released");
        Ok(())
    }

    /// Every owned port: reserved, claimed, and listened on by an ingress.
    pub async fn ports(&self) -> Vec<PortEntry> {
        let state = self.state.lock().await;
        let api_port = self.shared.config.api_listen.port();
        let mut rows: Vec<PortEntry> = self
            .reserved
            .iter()
            .map(|p| PortEntry {
                port: *p,
                kind: PortOwnerKind::Reserved,
                owner: if *p == api_port { "api" } else { "reserved" }.to_owned(),
                ingress_id: None,
                bound: None,
            })
            .collect();
        rows.extend(state.claims.iter().map(|(p, owner)| PortEntry {
            port: *p,
            kind: PortOwnerKind::Claim,
            owner: owner.clone(),
            ingress_id: None,
            bound: None,
        }));
        rows.extend(state.ingresses.values().map(|e| PortEntry {
            port: e.ingress.listen_port,
            kind: PortOwnerKind::TcpIngress,
            owner: e.ingress.name.clone(),
            ingress_id: Some(e.ingress.id.clone()),
            bound: Some(e.bind_error.is_none()),
        }));
        rows.sort_by_key(|r| r.port);
        rows
    }

    /// Registers or moves a static instance; `Ok((instance, true))` when newly created.
    pub async fn put_instance(
        &self,
        name: &str,
        spec: InstanceSpec,
    ) -> Result<(Instance, bool), ApiError> {
        validate_name("name", name)?;
        let not_allowed = |e: crate::backend::PolicyError| {
            ApiError::new(ErrorCode::BackendNotAllowed, format!("address: {e}"))
        };
        self.shared
            .policy
            .check_ip(spec.address)
            .map_err(not_allowed)?;
        let state = self.state.lock().await;
        // Literal targets naming this instance must still pass the policy at the new address.
        for e in state.ingresses.values() {
            let ports = e
                .ingress
                .rules
                .iter()
                .filter(|r| r.target.instance == name)
                .map(|r| r.target.port)
                .chain(
                    e.ingress
                        .default_target
                        .iter()
                        .filter(|d| d.instance == name)
                        .map(|d| d.port),
                );
            for port in ports {
                self.shared
                    .policy
                    .check(SocketAddr::new(spec.address, port))
                    .map_err(not_allowed)?;
            }
        }
        let inst = Instance {
            name: name.to_owned(),
            address: spec.address,
        };
        self.store
            .put(Kind::Instance, name, &inst)
            .map_err(|e| internal("writing instance", e))?;
        let created = self.shared.instances.insert(name, spec.address).is_none();
        drop(state);
        tracing::info!(name, address = %spec.address, "instance registered");
        Ok((inst, created))
    }

    /// One static instance.
    pub fn get_instance(&self, name: &str) -> Result<Instance, ApiError> {
        self.shared
            .instances
            .address(name)
            .map(|address| Instance {
                name: name.to_owned(),
                address,
            })
            .ok_or_else(|| ApiError::not_found(format!("instance {name:?} does not exist")))
    }

    /// Every static instance, by name.
    pub fn list_instances(&self) -> Vec<Instance> {
        self.shared
            .instances
            .snapshot()
            .iter()
            .map(|(name, address)| Instance {
                name: name.clone(),
                address: *address,
            })
            .collect()
    }

    /// Removes a static instance; connections routed to it fail at connect from then on.
    pub async fn delete_instance(&self, name: &str) -> Result<(), ApiError> {
        let _state = self.state.lock().await;
        if self.shared.instances.address(name).is_none() {
            return Err(ApiError::not_found(format!(
                "instance {name:?} does not exist"
            )));
        }
        self.store
            .delete(Kind::Instance, name)
            .map_err(|e| internal("removing instance", e))?;
        self.shared.instances.remove(name);
        tracing::info!(name, "instance removed");
        Ok(())
    }

    /// Stores a certificate (file mode 0600) after proving the key works with the chain.
    pub async fn create_certificate(&self, spec: CertificateSpec) -> Result<Certificate, ApiError> {
        validate_name("name", &spec.name)?;
        let _state = self.state.lock().await;
        if self.shared.certs.get(&spec.name).is_some() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("name: certificate {:?} already exists", spec.name),
            ));
        }
        let rec = StoredCertificate {
            name: spec.name,
            cert_pem: spec.cert_pem,
            key_pem: spec.key_pem,
            created_at: super::ingresses::now_rfc3339(),
        };
        let loaded = certs::load(&rec)?;
        self.store
            .put(Kind::Certificate, &rec.name, &rec)
            .map_err(|e| internal("writing certificate", e))?;
        let info = loaded.info.clone();
        self.shared.certs.insert(loaded);
        tracing::info!(name = %info.name, sans = ?info.sans, "certificate stored");
        Ok(info)
    }

    /// One certificate (never the key).
    pub fn get_certificate(&self, name: &str) -> Result<Certificate, ApiError> {
        self.shared
            .certs
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("certificate {name:?} does not exist")))
    }

    /// Every certificate, by name.
    pub fn list_certificates(&self) -> Vec<Certificate> {
        self.shared.certs.list()
    }

    /// Deletes a certificate unless a terminate rule would be left without one.
    pub async fn delete_certificate(&self, name: &str) -> Result<(), ApiError> {
        let state = self.state.lock().await;
        self.get_certificate(name)?;
        let remaining = self.shared.certs.without(name);
        for e in state.ingresses.values() {
            for (i, rule) in e.ingress.rules.iter().enumerate() {
                let Ok(pattern) = crate::pattern::SniPattern::parse(&rule.match_.sni) else {
                    continue;
                };
                if rule.mode == Mode::Terminate && !remaining.covers(&pattern) {
                    return Err(ApiError::new(
                        ErrorCode::InUse,
                        format!(
                            "certificate {name:?} is the only one covering {:?} (tcp ingress {:?}, rules[{i}])",
                            rule.match_.sni, e.ingress.name
                        ),
                    ));
                }
            }
        }
        self.store
            .delete(Kind::Certificate, name)
            .map_err(|e| internal("removing certificate", e))?;
        self.shared.certs.remove(name);
        tracing::info!(name, "certificate removed");
        Ok(())
    }
}
