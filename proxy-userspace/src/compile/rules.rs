//! A VirtualService's `http`, `tcp` and `tls` rules compiled for one scope (a mesh port or a
//! gateway port), with their destinations resolved to clusters.

use super::*;

impl Compiler<'_> {
    /// Compile the `http[]` rules of `vs` for `scope`, dropping blocks for other ports or
    /// gateways and rules left without blocks.
    pub(super) fn http_rules(
        &mut self,
        vs: &Object<VirtualService>,
        scope: &Scope<'_>,
    ) -> Vec<HttpRule> {
        let mut out = Vec::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            let mut matches = Vec::new();
            for (j, m) in r.matches.iter().enumerate() {
                if m.port.is_some_and(|p| p != scope.port as u32) {
                    continue;
                }
                if !m.gateways.is_empty()
                    && !scope
                        .gateways
                        .iter()
                        .any(|g| bound_to(&m.gateways, &vs.namespace, g, false))
                {
                    continue;
                }
                match compile_match(m) {
                    Ok(mut cm) => {
                        // At a gateway with block gateways, sourceLabels are not checked.
                        if !m.gateways.is_empty()
                            && let Some(mut r) = cm.rare.take()
                        {
                            r.source_labels.clear();
                            r.source_namespace = None;
                            cm.rare = r.boxed();
                        }
                        matches.push(cm)
                    }
                    Err((f, e)) => self.error(vs, format!("spec.http[{i}].match[{j}].{f}"), e),
                }
            }
            if !r.matches.is_empty() && matches.is_empty() {
                continue;
            }
            match self.http_rule(vs, i, r, matches, scope) {
                Ok(rule) => out.push(rule),
                Err((f, e)) => self.error(vs, format!("spec.http[{i}].{f}"), e),
            }
        }
        out
    }

    pub(super) fn destination(
        &self,
        d: &config::Destination,
        ns: &str,
        scope: &Scope<'_>,
    ) -> (ClusterRef, String) {
        let host = expand_host(&d.host, ns, &self.set.cluster_domain);
        let svc = self
            .snap
            .registry
            .by_host(&host)
            .map(|s| &self.snap.registry.services[s]);
        let port = match (d.port, svc) {
            (Some(p), _) => p.number as u16,
            (None, Some(s)) if s.ports.len() == 1 => s.ports[0].number,
            _ => scope.default_port,
        };
        let key = ClusterKey {
            host,
            subset: d.subset.clone(),
            port,
            scope: None,
        };
        let name = key.name();
        match self.snap.cluster(&key) {
            Some(id) => (ClusterRef::Cluster(id), name),
            None => (ClusterRef::Missing(name.clone()), name),
        }
    }

    pub(super) fn http_rule(
        &self,
        vs: &Object<VirtualService>,
        _index: usize,
        r: &HttpRoute,
        matches: Vec<HttpMatch>,
        scope: &Scope<'_>,
    ) -> Result<HttpRule, (String, String)> {
        let ns = &vs.namespace;
        let action = if let Some(d) = &r.direct_response {
            let body = match &d.body {
                Some(b) => match (&b.string, &b.bytes) {
                    (Some(s), _) => s.clone().into_bytes(),
                    (None, Some(b64)) => decode_base64(b64).ok_or((
                        "directResponse.body.bytes".to_string(),
                        "invalid base64".to_string(),
                    ))?,
                    _ => Vec::new(),
                },
                None => Vec::new(),
            };
            HttpAction::DirectResponse {
                status: d.status as u16,
                body,
            }
        } else if let Some(rd) = &r.redirect {
            HttpAction::Redirect(Box::new(Redirect {
                uri: rd.uri.clone(),
                prefix_rewrite: rd.prefix_rewrite.clone(),
                authority: rd.authority.clone(),
                port: rd.port.map(|p| p as u16),
                from_request_port: rd.derive_port.as_deref() == Some("FROM_REQUEST_PORT"),
                scheme: rd.scheme.clone(),
                code: rd.redirect_code.unwrap_or(301) as u16,
            }))
        } else {
            let single = r.route.len() == 1;
            let mut clusters = Vec::new();
            for (k, d) in r.route.iter().enumerate() {
                let weight = if single { 1 } else { route::weight(d.weight) };
                if weight == 0 {
                    continue;
                }
                let (cluster, name) = self.destination(&d.destination, ns, scope);
                let headers = header_rules(d.headers.as_deref())
                    .map_err(|e| (format!("route[{k}].headers"), e))?;
                clusters.push(WeightedCluster {
                    cluster,
                    name,
                    weight,
                    headers,
                });
            }
            if clusters.is_empty() {
                return Err((
                    "route".into(),
                    "no destination with a weight above 0".into(),
                ));
            }
            HttpAction::Route(WeightedClusters::new(clusters))
        };
        let fault = r
            .fault
            .as_ref()
            .map(|f| compile_fault(f).map(Box::new))
            .transpose()
            .map_err(|e| ("fault".to_string(), e))?;
        let retry = match &r.retries {
            None => RetryPolicy::default(),
            Some(rt) => {
                let retry_on = match rt.retry_on.as_deref() {
                    Some(s) if !s.is_empty() => {
                        RetryOn::parse(s).map_err(|e| ("retries.retryOn".to_string(), e))?
                    }
                    _ => RetryOn::parse(DEFAULT_RETRY_ON).expect("default parses"),
                };
                RetryPolicy {
                    num_retries: u32::try_from(rt.attempts.max(0)).unwrap_or(u32::MAX),
                    per_try_timeout: rt.per_try_timeout.map(|d| d.get()),
                    retry_on,
                    backoff_base: rt
                        .backoff
                        .map(|d| d.get())
                        .unwrap_or(std::time::Duration::from_millis(25)),
                    ignore_previous_hosts: rt.retry_ignore_previous_hosts.unwrap_or(true),
                }
            }
        };
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let per_million = match (r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => p.per_million(),
                (None, Some(p)) => p.min(100) * 10_000,
                (None, None) => 1_000_000,
            };
            let (cluster, name) = self.destination(m, ns, scope);
            mirrors.push(Mirror {
                cluster,
                name,
                per_million,
            });
        }
        for m in &r.mirrors {
            let (cluster, name) = self.destination(&m.destination, ns, scope);
            mirrors.push(Mirror {
                cluster,
                name,
                per_million: m.percentage.map(|p| p.per_million()).unwrap_or(1_000_000),
            });
        }
        let cors = r
            .cors_policy
            .as_ref()
            .map(|c| compile_cors(c))
            .transpose()
            .map_err(|e| ("corsPolicy".to_string(), e))?;
        let headers = header_rules(r.headers.as_deref()).map_err(|e| ("headers".to_string(), e))?;
        let rewrite = match &r.rewrite {
            None => None,
            Some(rw) => Some(Rewrite {
                uri: rw.uri.clone(),
                uri_regex: match &rw.uri_regex_rewrite {
                    Some(x) => Some((
                        FullRegex::new(&x.pattern).map_err(|e| {
                            ("rewrite.uriRegexRewrite.match".to_string(), e.to_string())
                        })?,
                        x.rewrite.clone(),
                    )),
                    None => None,
                },
                authority: rw.authority.clone(),
            }),
        };
        Ok(HttpRule {
            name: r.name.clone(),
            origin: match &r.delegated_from {
                Some(d) => format!("VirtualService/{}/{} < {d}", vs.namespace, vs.name),
                None => format!("VirtualService/{}/{}", vs.namespace, vs.name),
            },
            matches,
            action,
            fault,
            timeout: r.timeout.map(|d| d.get()).filter(|d| !d.is_zero()),
            retry,
            mirrors,
            cors: cors.map(Box::new),
            headers,
            rewrite: rewrite.map(Box::new),
        })
    }

    pub(super) fn l4_rules(
        &mut self,
        vs: &Object<VirtualService>,
        scope: &Scope<'_>,
        tls: bool,
    ) -> Vec<L4Rule> {
        let mut out = Vec::new();
        let rules: Vec<(Vec<L4Match>, bool, &Vec<config::RouteDestination>)> = if tls {
            vs.spec
                .tls
                .iter()
                .map(|r| {
                    let ms: Vec<L4Match> = r
                        .matches
                        .iter()
                        .filter(|m| {
                            m.port.is_none_or(|p| p == scope.port as u32)
                                && gateway_ok(&m.gateways, &vs.namespace, &scope.gateways)
                        })
                        .map(|m| L4Match {
                            sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                            destination_subnets: parse_subnets(&m.destination_subnets),
                            source_labels: m.source_labels.clone(),
                            source_namespace: m.source_namespace.clone(),
                        })
                        .collect();
                    (ms, !r.matches.is_empty(), &r.route)
                })
                .collect()
        } else {
            vs.spec
                .tcp
                .iter()
                .map(|r| {
                    let ms: Vec<L4Match> = r
                        .matches
                        .iter()
                        .filter(|m| {
                            m.port.is_none_or(|p| p == scope.port as u32)
                                && gateway_ok(&m.gateways, &vs.namespace, &scope.gateways)
                        })
                        .map(|m| L4Match {
                            sni_hosts: Vec::new(),
                            destination_subnets: parse_subnets(&m.destination_subnets),
                            source_labels: m.source_labels.clone(),
                            source_namespace: m.source_namespace.clone(),
                        })
                        .collect();
                    (ms, !r.matches.is_empty(), &r.route)
                })
                .collect()
        };
        for (matches, had, route) in rules {
            if had && matches.is_empty() {
                continue;
            }
            let single = route.len() == 1;
            let clusters: Vec<WeightedCluster> = route
                .iter()
                .filter_map(|d| {
                    let weight = if single { 1 } else { route::weight(d.weight) };
                    (weight > 0).then(|| {
                        let (cluster, name) =
                            self.destination(&d.destination, &vs.namespace, scope);
                        WeightedCluster {
                            cluster,
                            name,
                            weight,
                            headers: HeaderRules::default(),
                        }
                    })
                })
                .collect();
            if clusters.is_empty() {
                continue;
            }
            out.push(L4Rule {
                origin: format!("VirtualService/{}/{}", vs.namespace, vs.name),
                matches,
                route: WeightedClusters::new(clusters),
            });
        }
        out
    }
}
