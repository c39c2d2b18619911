//! TCP ingress operations: list, get by ID/name/prefix, create, replace, delete, and loading.
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{ControlPlane, IngressEntry, State, internal};
use crate::error::{ApiError, ErrorCode};
use crate::listeners::{self, BindError, BoundListener, Listeners};
use crate::model::{IngressSpec, Mode, TcpIngress};
use crate::route::RouteTable;
use crate::store::Kind;

fn new_id() -> String {
    let bytes: [u8; 10] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl From<BindError> for ApiError {
    fn from(e: BindError) -> Self {
        match e {
            BindError::InUse { .. } => {
                ApiError::new(ErrorCode::PortInUse, format!("listen_port: {e}"))
            }
            BindError::Io { .. } => internal("binding listener", e),
        }
    }
}

impl State {
    /// Resolves `{id}`: exact ID, exact name, then unique ID prefix.
    fn resolve(&self, key: &str) -> Result<&IngressEntry, ApiError> {
        if let Some(e) = self.ingresses.get(key) {
            return Ok(e);
        }
        if let Some(e) = self.ingresses.values().find(|e| e.ingress.name == key) {
            return Ok(e);
        }
        let mut matches = self
            .ingresses
            .range(key.to_owned()..)
            .take_while(|(id, _)| id.starts_with(key));
        match (matches.next(), matches.next()) {
            (Some((_, e)), None) if !key.is_empty() => Ok(e),
            (Some(_), Some(_)) => Err(ApiError::new(
                ErrorCode::Ambiguous,
                format!("id: {key:?} is a prefix of several tcp ingress IDs"),
            )),
            _ => Err(ApiError::not_found(format!(
                "tcp ingress {key:?} does not exist"
            ))),
        }
    }
}

impl ControlPlane {
    /// Every TCP ingress, by ID.
    pub async fn list_ingresses(&self) -> Vec<TcpIngress> {
        let state = self.state.lock().await;
        state
            .ingresses
            .values()
            .map(|e| e.ingress.clone())
            .collect()
    }

    /// One TCP ingress by ID, name or unique ID prefix.
    pub async fn get_ingress(&self, key: &str) -> Result<TcpIngress, ApiError> {
        let state = self.state.lock().await;
        state.resolve(key).map(|e| e.ingress.clone())
    }

    /// Checks what needs outside state: name and port ownership, literal targets, backend
    /// policy, certificates. `except` is the ingress being replaced.
    async fn check_ingress(
        &self,
        state: &State,
        spec: &mut IngressSpec,
        except: Option<&str>,
    ) -> Result<RouteTable, ApiError> {
        let checked = spec.validate()?;
        if let Some(other) = state
            .ingresses
            .values()
            .find(|e| e.ingress.name == spec.name && Some(e.ingress.id.as_str()) != except)
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "name: tcp ingress {:?} already exists (id {})",
                    spec.name, other.ingress.id
                ),
            ));
        }
        self.check_port(state, spec.listen_port, except, "listen_port")?;
        for (i, (rule, c)) in spec.rules.iter().zip(&checked).enumerate() {
            if let Some(name) = c.template.literal() {
                self.check_target(&format!("rules[{i}].target"), name, rule.target.port)
                    .await?;
            }
            if rule.mode == Mode::Terminate && !self.shared.certs.covers(&c.pattern) {
                return Err(ApiError::new(
                    ErrorCode::NoCertificate,
                    format!(
                        "rules[{i}].match.sni: no stored certificate covers {:?} (mode terminate)",
                        c.pattern.as_str()
                    ),
                ));
            }
        }
        if let Some(d) = &spec.default_target {
            self.check_target("default_target", &d.instance, d.port)
                .await?;
        }
        let probe = TcpIngress {
            id: String::new(),
            name: spec.name.clone(),
            listen_port: spec.listen_port,
            rules: spec.rules.clone(),
            default_target: spec.default_target.clone(),
            idle_timeout_secs: spec.idle_timeout_secs,
            created_at: String::new(),
        };
        RouteTable::build(&probe)
    }

    /// A literal target must resolve (static registry or DNS) to an address the policy allows.
    async fn check_target(&self, field: &str, instance: &str, port: u16) -> Result<(), ApiError> {
        let ip = self.shared.resolver.resolve(instance).await.map_err(|e| {
            ApiError::new(
                ErrorCode::InstanceNotFound,
                format!("{field}.instance: {e}"),
            )
        })?;
        self.shared
            .policy
            .check(SocketAddr::new(ip, port))
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::BackendNotAllowed,
                    format!("{field}: instance {instance:?} at {e}"),
                )
            })
    }

    /// Creates an ingress: validates, binds its listener, persists, starts serving.
    pub async fn create_ingress(&self, mut spec: IngressSpec) -> Result<TcpIngress, ApiError> {
        let mut state = self.state.lock().await;
        let table = self.check_ingress(&state, &mut spec, None).await?;
        let bound = listeners::bind(self.listen_ip(), spec.listen_port)?;
        let mut id = new_id();
        while state.ingresses.contains_key(&id) {
            id = new_id();
        }
        let ingress = TcpIngress {
            id: id.clone(),
            name: spec.name,
            listen_port: spec.listen_port,
            rules: spec.rules,
            default_target: spec.default_target,
            idle_timeout_secs: spec.idle_timeout_secs,
            created_at: now_rfc3339(),
        };
        self.store
            .put(Kind::TcpIngress, &id, &ingress)
            .map_err(|e| internal("writing tcp ingress", e))?;
        let routes = Arc::new(ArcSwap::from_pointee(table));
        if let Err(e) = self.start_listener(&ingress, &routes, bound).await {
            // Undo the write so disk and memory agree; the error is what the client sees.
            if let Err(undo) = self.store.delete(Kind::TcpIngress, &id) {
                tracing::error!(%id, error = %undo, "cannot remove the record of a failed create");
            }
            return Err(e);
        }
        tracing::info!(id = %ingress.id, name = %ingress.name, port = ingress.listen_port, "tcp ingress created");
        state.ingresses.insert(
            id,
            IngressEntry {
                ingress: ingress.clone(),
                routes,
                bind_error: None,
            },
        );
        Ok(ingress)
    }

    async fn start_listener(
        &self,
        ingress: &TcpIngress,
        routes: &crate::route::SharedRoutes,
        bound: BoundListener,
    ) -> Result<(), ApiError> {
        let previous = self
            .listeners
            .start(&ingress.id, &ingress.name, routes.clone(), bound)?;
        if let Some(task) = previous {
            Listeners::stop_task(task).await;
        }
        Ok(())
    }

    /// Replaces an ingress's spec (its name stays); swaps the routing table atomically and
    /// rebinds only if the port changed (or the listener was not bound).
    ///
    /// Everything that can fail comes first — checks, binding the new port, writing the
    /// record, starting the new listener (the record is put back if that fails) — so a failed
    /// replace leaves the old record, table and listener as they were.
    pub async fn replace_ingress(
        &self,
        key: &str,
        mut spec: IngressSpec,
    ) -> Result<TcpIngress, ApiError> {
        let mut state = self.state.lock().await;
        let entry = state.resolve(key)?;
        let (id, old) = (entry.ingress.id.clone(), entry.ingress.clone());
        let was_bound = entry.bind_error.is_none();
        if spec.name.to_ascii_lowercase() != old.name {
            return Err(ApiError::bad_request(format!(
                "name: cannot change the name of tcp ingress {:?}; create a new one",
                old.name
            )));
        }
        let table = self.check_ingress(&state, &mut spec, Some(&id)).await?;
        let rebind = spec.listen_port != old.listen_port || !was_bound;
        let bound = if rebind {
            Some(listeners::bind(self.listen_ip(), spec.listen_port)?)
        } else {
            None
        };
        let ingress = TcpIngress {
            id: id.clone(),
            name: old.name.clone(),
            listen_port: spec.listen_port,
            rules: spec.rules,
            default_target: spec.default_target,
            idle_timeout_secs: spec.idle_timeout_secs,
            created_at: old.created_at.clone(),
        };
        self.store
            .put(Kind::TcpIngress, &id, &ingress)
            .map_err(|e| internal("writing tcp ingress", e))?;
        let Some(entry) = state.ingresses.get_mut(&id) else {
            return Err(ApiError::internal("tcp ingress vanished during replace"));
        };
        if let Some(bound) = bound {
            // The new listener serves a table of its own until the start succeeds: the old
            // listener, if any, keeps the old one meanwhile.
            let routes = Arc::new(ArcSwap::from_pointee(table));
            if let Err(e) = self.start_listener(&ingress, &routes, bound).await {
                if let Err(undo) = self.store.put(Kind::TcpIngress, &id, &old) {
                    tracing::error!(%id, error = %undo, "cannot restore the record of a failed replace");
                }
                return Err(e);
            }
            entry.routes = routes;
            entry.bind_error = None;
        } else {
            entry.routes.store(Arc::new(table));
        }
        entry.ingress = ingress.clone();
        tracing::info!(%id, name = %ingress.name, port = ingress.listen_port, "tcp ingress replaced");
        Ok(ingress)
    }

    /// Deletes an ingress: removes its record and closes its listener; established
    /// connections continue to completion.
    pub async fn delete_ingress(&self, key: &str) -> Result<(), ApiError> {
        let mut state = self.state.lock().await;
        let id = state.resolve(key)?.ingress.id.clone();
        self.store
            .delete(Kind::TcpIngress, &id)
            .map_err(|e| internal("removing tcp ingress", e))?;
        let entry = state.ingresses.remove(&id);
        if let Some(task) = self.listeners.take(&id) {
            Listeners::stop_task(task).await;
        }
        if let Some(e) = entry {
            tracing::info!(%id, name = %e.ingress.name, "tcp ingress deleted");
        }
        Ok(())
    }

    /// Loads the ingress records and binds their listeners; reports what cannot be applied.
    pub(super) async fn load_ingresses(&self) {
        let (records, failed) = self.store.load_all::<TcpIngress>(Kind::TcpIngress);
        failed.into_iter().for_each(|f| self.report(f));
        let mut state = self.state.lock().await;
        for (key, ingress) in records {
            let path = self.store.path(Kind::TcpIngress, &key);
            let applied = self.apply_loaded(&state, &key, &ingress);
            let table = match applied {
                Ok(t) => t,
                Err(reason) => {
                    self.report(self.store.failure(&path, reason));
                    continue;
                }
            };
            let routes = Arc::new(ArcSwap::from_pointee(table));
            let bound = match self.take_inherited(ingress.listen_port) {
                Some(inherited) => Ok(inherited),
                None => listeners::bind(self.listen_ip(), ingress.listen_port),
            };
            let bind_error = match bound {
                Ok(bound) => self
                    .start_listener(&ingress, &routes, bound)
                    .await
                    .err()
                    .map(|e| e.message),
                Err(e) => Some(e.to_string()),
            };
            if let Some(error) = &bind_error {
                tracing::warn!(id = %ingress.id, name = %ingress.name, %error, "listener not bound");
            }
            state.ingresses.insert(
                key,
                IngressEntry {
                    ingress,
                    routes,
                    bind_error,
                },
            );
        }
    }

    fn apply_loaded(
        &self,
        state: &State,
        key: &str,
        ingress: &TcpIngress,
    ) -> Result<RouteTable, String> {
        if ingress.id != key {
            return Err(format!(
                "record id {:?} does not match its file name",
                ingress.id
            ));
        }
        let table = RouteTable::build(ingress).map_err(|e| format!("invalid: {}", e.message))?;
        if state
            .ingresses
            .values()
            .any(|e| e.ingress.name == ingress.name)
        {
            return Err(format!(
                "name {:?} is already used by another record",
                ingress.name
            ));
        }
        self.check_port(state, ingress.listen_port, None, "listen_port")
            .map_err(|e| format!("cannot apply: {}", e.message))?;
        Ok(table)
    }
}
