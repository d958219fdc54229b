{{/* Chart name, overridable. */}}
{{- define "glmtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects; the release name alone when it already holds the chart name. */}}
{{- define "glmtune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "glmtune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod: stable across upgrades. */}}
{{- define "glmtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "glmtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "glmtune.labels" -}}
helm.sh/chart: {{ include "glmtune.chart" . }}
{{ include "glmtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: glmtune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "glmtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "glmtune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag of an image value, the tag defaulting to the chart's appVersion. Call with (list $image $). */}}
{{- define "glmtune.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
What the operator does in each watched namespace; the one list both the ClusterRole (all namespaces) and
the per-namespace Roles use. kopf patches the GLMFineTune itself (finalizers, handler progress) and its
status; children are created, patched and deleted; Secrets are only read (S3 credentials a CR names).
*/}}
{{- define "glmtune.workloadRules" -}}
- apiGroups: ["glmtune.io"]
  resources: ["glmfinetunes"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["glmtune.io"]
  resources: ["glmfinetunes/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
