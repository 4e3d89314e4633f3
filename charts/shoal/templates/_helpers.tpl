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

{{/* The DNS suffix of the release's namespace: NS.svc.DOMAIN */}}
{{- define "shoal.svcSuffix" -}}{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}{{- end -}}

{{/* Every origin's stable host:port (the StatefulSet's pod names): the cluster's member ids. */}}
{{- define "shoal.origin.members" -}}
{{- $members := list -}}
{{- range $i := until (int .Values.origin.replicas) -}}
{{- $members = append $members (printf "%s-origin-%d.%s.%s:%d" (include "shoal.fullname" $) $i (include "shoal.origin.headless" $) (include "shoal.svcSuffix" $) (int $.Values.origin.port)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* Every origin's URL, for trackers and agents (they fail over from one to the next). */}}
{{- define "shoal.origin.urls" -}}
{{- $urls := list -}}
{{- range $m := splitList "," (include "shoal.origin.members" .) -}}
{{- $urls = append $urls (printf "http://%s" $m) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* Every tracker's URL: agents hash each digest to one of them. */}}
{{- define "shoal.tracker.urls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.tracker.replicas) -}}
{{- $urls = append $urls (printf "http://%s-tracker-%d.%s.%s:%d" (include "shoal.fullname" $) $i (include "shoal.tracker.headless" $) (include "shoal.svcSuffix" $) (int $.Values.tracker.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The registry name pods pull the origins' images by. */}}
{{- define "shoal.registryName" -}}
{{- default (printf "%s.%s:%d" (include "shoal.origin.service" .) (include "shoal.svcSuffix" .) (int .Values.origin.service.port)) .Values.containerd.registryName -}}
{{- end -}}

{{/* `--registry NAME=SERVER` values for `shoal node setup`. */}}
{{- define "shoal.mirroredRegistries" -}}
{{- $regs := list -}}
{{- if .Values.containerd.mirrorOrigins -}}
{{- if .Values.containerd.registryName -}}
{{- $regs = append $regs .Values.containerd.registryName -}}
{{- else -}}
{{- $regs = append $regs (printf "%s=http://%s" (include "shoal.registryName" .) (include "shoal.registryName" .)) -}}
{{- end -}}
{{- end -}}
{{- range .Values.containerd.extraRegistries -}}
{{- if .server -}}
{{- $regs = append $regs (printf "%s=%s" .name .server) -}}
{{- else -}}
{{- $regs = append $regs .name -}}
{{- end -}}
{{- end -}}
{{- join "," $regs -}}
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
