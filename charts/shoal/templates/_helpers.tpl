{{/* Names, labels and the addresses every component derives from the release. */}}

{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shoal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shoal.secretName" -}}
{{- default (printf "%s-cluster" (include "shoal.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end -}}

{{- define "shoal.secretKey" -}}
{{- if .Values.clusterSecret.existingSecret -}}{{ .Values.clusterSecret.existingSecretKey }}{{- else -}}secret{{- end -}}
{{- end -}}

{{/* Service names. */}}
{{- define "shoal.origin.headless" -}}{{ include "shoal.fullname" . }}-origin-headless{{- end -}}
{{- define "shoal.origin.service" -}}{{ include "shoal.fullname" . }}-origin{{- end -}}
{{- define "shoal.tracker.headless" -}}{{ include "shoal.fullname" . }}-tracker-headless{{- end -}}
{{- define "shoal.agent.service" -}}{{ include "shoal.fullname" . }}-agent{{- end -}}
{{- define "shoal.restore.service" -}}{{ include "shoal.fullname" . }}-restore{{- end -}}

{{/* Where the uninstall hook's restore pods listen: the wildcard of agent.listenAddress's
     family ([::] for an IPv6 address, with or without brackets; else 0.0.0.0) and
     containerd.restorePort. The restore pods are not on the host network, so they take the
     agent's address family, not its address. */}}
{{- define "shoal.restore.listen" -}}
{{- ternary "[::]" "0.0.0.0" (contains ":" .Values.agent.listenAddress) }}:{{ .Values.containerd.restorePort }}
{{- end -}}

{{/* ADDRESS:PORT for a listen flag, an IPv6 literal in brackets: "::" gives [::]:5000 (the
     binary refuses :::5000); "[::]" and IPv4 addresses are kept. (list ADDRESS PORT) */}}
{{- define "shoal.hostPort" -}}
{{- $a := index . 0 -}}
{{- if and (contains ":" $a) (not (hasPrefix "[" $a)) }}[{{ $a }}]{{ else }}{{ $a }}{{ end }}:{{ index . 1 | int }}
{{- end -}}

{{/* Fails when two listeners of one process share a port: the second cannot bind and the pod
     crashes at start. (list (list NAME PORT) ...) Renders nothing. */}}
{{- define "shoal.ports.distinct" -}}
{{- $seen := dict -}}
{{- range $p := . -}}
{{- $port := index $p 1 | int | toString -}}
{{- if hasKey $seen $port -}}
{{- fail (printf "%s and %s are both %s: one process listens on both and the second listener cannot bind (the pods crash at start); give each its own port" (get $seen $port) (index $p 0) $port) -}}
{{- end -}}
{{- $_ := set $seen $port (index $p 0) -}}
{{- end -}}
{{- end -}}

{{/* A pod's securityContext: the chart's settings for that pod (a dict) with
     podSecurityContext merged over them, the user's value winning key by key (one YAML map:
     writing both out gave duplicate keys). (list $ DICT) */}}
{{- define "shoal.podSecurityContext" -}}
{{- $sc := mustMergeOverwrite (deepCopy (index . 1)) (deepCopy ((index . 0).Values.podSecurityContext | default dict)) -}}
{{- if $sc }}{{ toYaml $sc }}{{ else }}{}{{ end -}}
{{- end -}}

{{/* The DNS suffix of the release's namespace: NS.svc.DOMAIN */}}
{{- define "shoal.svcSuffix" -}}{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}{{- end -}}

{{/* http, or https with tls.enabled. */}}
{{- define "shoal.scheme" -}}{{ ternary "https" "http" .Values.tls.enabled }}{{- end -}}

{{/* Every origin's stable host name (the StatefulSet's pod names). */}}
{{- define "shoal.origin.hosts" -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.origin.replicas) -}}
{{- $hosts = append $hosts (printf "%s-origin-%d.%s.%s" (include "shoal.fullname" $) $i (include "shoal.origin.headless" $) (include "shoal.svcSuffix" $)) -}}
{{- end -}}
{{- join "," $hosts -}}
{{- end -}}

{{/* The port origins reach each other on: the internal listener's with TLS, else the API's. */}}
{{- define "shoal.origin.memberPort" -}}{{ ternary .Values.tls.internalPort .Values.origin.port .Values.tls.enabled }}{{- end -}}

{{/* Every origin's host:port as the others reach it: the cluster's member ids. */}}
{{- define "shoal.origin.members" -}}
{{- $members := list -}}
{{- range $h := splitList "," (include "shoal.origin.hosts" .) -}}
{{- $members = append $members (printf "%s:%s" $h (include "shoal.origin.memberPort" $)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* Every origin's URL, for trackers and agents (they fail over from one to the next). */}}
{{- define "shoal.origin.urls" -}}
{{- $urls := list -}}
{{- range $h := splitList "," (include "shoal.origin.hosts" .) -}}
{{- $urls = append $urls (printf "%s://%s:%d" (include "shoal.scheme" $) $h (int $.Values.origin.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The Secret holding COMPONENT's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "shoal.tls.secret" -}}
{{- $ctx := index . 0 -}}{{- $component := index . 1 -}}
{{- default (printf "%s-%s-tls" (include "shoal.fullname" $ctx) $component) (index $ctx.Values.tls.existingSecrets $component) -}}
{{- end -}}

{{/* With TLS but without cert-manager, every component needs a Secret named in
     tls.existingSecrets: nothing else creates FULLNAME-COMPONENT-tls, and pods mounting
     it never start. Renders nothing. */}}
{{- define "shoal.tls.check" -}}
{{- if and .Values.tls.enabled (not .Values.tls.certManager.enabled) -}}
{{- $missing := list -}}
{{- range $component := list "origin" "tracker" "agent" -}}
{{- if not (index $.Values.tls.existingSecrets $component) -}}
{{- $missing = append $missing (printf "tls.existingSecrets.%s" $component) -}}
{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "tls.enabled with tls.certManager.enabled=false needs a certificate Secret for every component: set %s (or enable tls.certManager)" (join ", " $missing)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The flags that give a process its certificate and the cluster CA. */}}
{{- define "shoal.tls.args" -}}
{{- if .Values.tls.enabled }}
- --tls-cert=/etc/shoal-tls/tls.crt
- --tls-key=/etc/shoal-tls/tls.key
- --cluster-ca=/etc/shoal-tls/ca.crt
{{- end }}
{{- end -}}

{{/* Every tracker's URL: agents hash each digest to one of them. */}}
{{- define "shoal.tracker.urls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.tracker.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-tracker-%d.%s.%s:%d" (include "shoal.scheme" $) (include "shoal.fullname" $) $i (include "shoal.tracker.headless" $) (include "shoal.svcSuffix" $) (int $.Values.tracker.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The registry name pods pull the origins' images by. */}}
{{- define "shoal.registryName" -}}
{{- default (printf "%s.%s:%d" (include "shoal.origin.service" .) (include "shoal.svcSuffix" .) (int .Values.origin.service.port)) .Values.containerd.registryName -}}
{{- end -}}

{{/* `--registry NAME=SERVER` values for `shoal node setup` (each name once: it refuses a
     name given twice). */}}
{{- define "shoal.mirroredRegistries" -}}
{{- $regs := list -}}
{{- $named := list -}}
{{- if .Values.containerd.mirrorOrigins -}}
{{- $named = append $named (include "shoal.registryName" .) -}}
{{- if .Values.containerd.registryName -}}
{{- $regs = append $regs .Values.containerd.registryName -}}
{{- else -}}
{{- $regs = append $regs (printf "%s=%s://%s" (include "shoal.registryName" .) (include "shoal.scheme" .) (include "shoal.registryName" .)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $r := .Values.containerd.extraRegistries -}}
{{- if has $r.name $named -}}
{{- fail (printf "containerd.extraRegistries[%d].name %q is listed twice (or is containerd.registryName, mirrored already): shoal node setup refuses a registry given twice" $i $r.name) -}}
{{- end -}}
{{- $named = append $named .name -}}
{{- if .server -}}
{{- $regs = append $regs (printf "%s=%s" .name .server) -}}
{{- else -}}
{{- $regs = append $regs .name -}}
{{- end -}}
{{- end -}}
{{- /* Upstreams the origins pull through: containerd on every node sends their pulls to the
     agent (which maps ?ns= to them), falling back to the upstream itself. One already in
     extraRegistries keeps that entry (and its server). */ -}}
{{- range .Values.upstreams -}}
{{- if and (ne .mirrorOnNodes false) (not (has .registry $named)) -}}
{{- $regs = append $regs (printf "%s=%s" .registry (trimSuffix "/" .url)) -}}
{{- end -}}
{{- end -}}
{{- join "," $regs -}}
{{- end -}}

{{/* The directory of upstream REGISTRY's password and CA files in the origin container. */}}
{{- define "shoal.upstream.dir" -}}/var/run/shoal-upstream/{{ . }}{{- end -}}

{{/* The `upstreams` value, checked where the schema cannot: each registry once (the origin
     would keep only the last section, `shoal node setup` refuses a name twice), none named
     like the origins' own registry, none also in origin.config. Renders nothing. */}}
{{- define "shoal.upstreams.check" -}}
{{- if hasKey (.Values.origin.config | default dict) "upstream" -}}
{{- fail "origin.config.upstream: set upstream registries in the chart's `upstreams` value, not in origin.config (the chart mounts their password and CA files)" -}}
{{- end -}}
{{- $seen := list -}}
{{- range $i, $u := .Values.upstreams -}}
{{- if has $u.registry $seen -}}
{{- fail (printf "upstreams[%d].registry %q is listed twice in upstreams" $i $u.registry) -}}
{{- end -}}
{{- $seen = append $seen $u.registry -}}
{{- if and $.Values.containerd.mirrorOrigins (eq $u.registry (include "shoal.registryName" $)) -}}
{{- fail (printf "upstreams[%d].registry %q is containerd.registryName, the origins' own registry: pulls by that name would go to the upstream" $i $u.registry) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Fails when CONFIG (origin.config or agent.config) sets a key the chart also sets by a
     flag or the environment, which would override it without a word. KEYS maps each dotted
     key to what to set instead. (list CONFIG "origin.config" KEYS) Renders nothing. */}}
{{- define "shoal.config.flagKeys" -}}
{{- $config := index . 0 | default dict -}}
{{- $value := index . 1 -}}
{{- range $path, $use := index . 2 -}}
{{- $node := $config -}}
{{- $found := true -}}
{{- range $k := splitList "." $path -}}
{{- if and $found (kindIs "map" $node) (hasKey $node $k) -}}
{{- $node = index $node $k -}}
{{- else -}}
{{- $found = false -}}
{{- end -}}
{{- end -}}
{{- if $found -}}
{{- fail (printf "%s.%s is set by the chart with a flag, which overrides the config file: remove it and set %s" $value $path $use) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The origin's config file (origin.toml): origin.config, then one [[upstream]] section per
     entry of `upstreams`. It may hold passwords (auth.users) and cluster secrets
     (cluster.accepted_secrets): it goes into a Secret (origin-config.yaml), never the
     ConfigMap. Upstream passwords and CAs are files on a volume of the origin pods
     (origin-statefulset.yaml), never in it either. */}}
{{- define "shoal.origin.toml" -}}
# Rendered from the chart's origin.config and upstreams (see docs/configuration.md).
{{- with .Values.origin.config }}
{{ include "shoal.toToml" . }}
{{- end }}
{{- $sections := list }}
{{- range .Values.upstreams }}
{{- $s := dict "registry" .registry "url" .url }}
{{- if .username }}
{{- $_ := set $s "username" .username }}
{{- $_ := set $s "password_file" (printf "%s/password" (include "shoal.upstream.dir" .registry)) }}
{{- end }}
{{- if .caSecret }}
{{- $_ := set $s "ca_file" (printf "%s/ca.pem" (include "shoal.upstream.dir" .registry)) }}
{{- end }}
{{- with .tagTtl }}
{{- $_ := set $s "tag_ttl" . }}
{{- end }}
{{- with .serveStale }}
{{- $_ := set $s "serve_stale" . }}
{{- end }}
{{- with .privateRecheck }}
{{- $_ := set $s "private_recheck" . }}
{{- end }}
{{- $sections = append $sections $s }}
{{- end }}
{{- with $sections }}
{{ toToml (dict "upstream" .) }}
{{- end }}
{{- end -}}

{{/* A duration of the schema's form (Go's h, m and s units, e.g. 2160h, 1h30m, 0.5h) in
     seconds, as a string ("%f"). */}}
{{- define "shoal.duration.seconds" -}}
{{- $total := 0.0 -}}
{{- range $part := regexFindAll "[0-9]+(\\.[0-9]+)?[hms]" . -1 -}}
{{- $unit := regexFind "[hms]$" $part -}}
{{- $total = addf $total (mulf (trimSuffix $unit $part | float64) (get (dict "h" 3600 "m" 60 "s" 1) $unit)) -}}
{{- end -}}
{{- printf "%f" $total -}}
{{- end -}}

{{/* cert-manager renews a certificate when renewBefore is left. Shoal warns about one in the
     last quarter of its life (a renewal missed: renewals come at a third) and the
     PrometheusRule's ShoalCertificateExpiring fires below 7 days for an hour, so a renewal
     later than either warns every pod, or pages, every cycle. Renders nothing. */}}
{{- define "shoal.tls.renewCheck" -}}
{{- $cm := .Values.tls.certManager -}}
{{- $life := include "shoal.duration.seconds" $cm.duration | float64 -}}
{{- $renew := include "shoal.duration.seconds" $cm.renewBefore | float64 -}}
{{- if lt $renew (divf $life 4) -}}
{{- fail (printf "tls.certManager.renewBefore %s is less than a quarter of tls.certManager.duration %s: Shoal warns about a certificate in the last quarter of its life; renew at a third (e.g. renewBefore 720h with duration 2160h)" $cm.renewBefore $cm.duration) -}}
{{- end -}}
{{- if and .Values.metrics.prometheusRule.enabled (le $renew (mulf 169 3600)) -}}
{{- fail (printf "tls.certManager.renewBefore %s must be more than 169h with metrics.prometheusRule.enabled: ShoalCertificateExpiring fires once a certificate has less than 7 days left for an hour, before such a renewal" $cm.renewBefore) -}}
{{- end -}}
{{- end -}}

{{/* toToml, with YAML's integers as TOML integers: Helm reads every number in values as a
     float, which toToml writes as `512.0`, and Shoal's integer settings refuse floats (Shoal
     has no float settings). */}}
{{- define "shoal.toToml" -}}
{{- regexReplaceAll "(?m)^(\\s*[A-Za-z0-9_-]+ = -?[0-9]+)\\.0$" (toToml .) "${1}" -}}
{{- end -}}

{{/* Container security settings: no privilege, read-only root, every capability dropped. */}}
{{- define "shoal.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Downward-API environment every Shoal container gets. */}}
{{- define "shoal.downwardEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: NODE_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end -}}
