{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "inferaligner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "inferaligner.fullname" -}}
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

{{- define "inferaligner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels, without the component. */}}
{{- define "inferaligner.commonLabels" -}}
helm.sh/chart: {{ include "inferaligner.chart" . }}
{{ include "inferaligner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: inferaligner
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "inferaligner.labels" -}}
{{ include "inferaligner.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "inferaligner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferaligner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inferaligner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferaligner.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images and derived settings ------------------------------------------------------- */}}

{{/* The sidecar image: the appVersion tag (+ the CUDA suffix when gpu.enabled) unless a tag is given. */}}
{{- define "inferaligner.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = .Chart.AppVersion }}
{{- if .Values.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* `proxy` when something upstream answers harmless requests, `local` otherwise. */}}
{{- define "inferaligner.mode" -}}
{{- if and .Values.modelServer.enabled .Values.upstream.url }}
{{- fail "set either modelServer.enabled or upstream.url, not both" }}
{{- end }}
{{- if or .Values.modelServer.enabled .Values.upstream.url }}proxy{{ else }}local{{ end }}
{{- end }}

{{- define "inferaligner.upstreamURL" -}}
{{- if .Values.modelServer.enabled }}
{{- printf "http://127.0.0.1:%d" (int .Values.modelServer.port) }}
{{- else if .Values.upstream.url }}
{{- .Values.upstream.url }}
{{- else }}
{{- /* unused in local mode; the built-in default keeps the key present */ -}}
http://127.0.0.1:8000
{{- end }}
{{- end }}

{{/* Whole seconds of the drain period (config.server.drain_grace_s, rounded up). */}}
{{- define "inferaligner.drainSeconds" -}}
{{- ceil .Values.config.server.drain_grace_s | int }}
{{- end }}

{{/* terminationGracePeriodSeconds: given, and larger than preStop + drain, or derived. */}}
{{- define "inferaligner.terminationGracePeriod" -}}
{{- $floor := add (int .Values.preStopSleepSeconds) (include "inferaligner.drainSeconds" . | int) }}
{{- if kindIs "string" .Values.terminationGracePeriodSeconds }}
{{- add $floor 10 }}
{{- else }}
{{- $given := int .Values.terminationGracePeriodSeconds }}
{{- if le $given $floor }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than preStopSleepSeconds + config.server.drain_grace_s (%d)" $given $floor) }}
{{- end }}
{{- $given }}
{{- end }}
{{- end }}

{{/* The sidecar's resources, with nvidia.com/gpu added when gpu.enabled. */}}
{{- define "inferaligner.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.enabled }}
{{- $limits := deepCopy (get $res "limits" | default dict) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "inferaligner.modelPath" -}}
{{- $path := index . 0 }}{{ $root := index . 1 }}
{{- if $path }}{{ printf "%s/%s" (trimSuffix "/" $root.Values.model.mountPath) $path }}{{ end }}
{{- end }}

{{/* The config file --------------------------------------------------------------------- */}}

{{/* values.config with the chart-owned keys set: the document rendered as TOML. */}}
{{- define "inferaligner.configValues" -}}
{{- $cfg := deepCopy .Values.config }}
{{- range $section := list "server" "upstream" "model" }}
{{- if not (hasKey $cfg $section) }}{{ $_ := set $cfg $section dict }}{{ end }}
{{- end }}
{{- $_ := set $cfg.server "listen" (printf "0.0.0.0:%d" (int .Values.ports.http)) }}
{{- $_ := set $cfg.server "admin_listen" (printf "0.0.0.0:%d" (int .Values.ports.admin)) }}
{{- $_ := set $cfg.server "mode" (include "inferaligner.mode" .) }}
{{- $_ := set $cfg.upstream "url" (include "inferaligner.upstreamURL" .) }}
{{- $_ := set $cfg.model "export" (include "inferaligner.modelPath" (list .Values.model.export .)) }}
{{- $_ := set $cfg.model "pack" (include "inferaligner.modelPath" (list .Values.model.pack .)) }}
{{- $_ := set $cfg.model "provider" (ternary .Values.gpu.provider "cpu" .Values.gpu.enabled) }}
{{- toJson $cfg }}
{{- end }}

{{/* A TOML key: bare when it can be, quoted otherwise. */}}
{{- define "inferaligner.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A TOML value: JSON strings, booleans and arrays are valid TOML. Helm holds every number as a
float64, so the keys the sidecar reads as floats (below) are written with a decimal point and
the rest as integers. Keep the list equal to the float keys of config/default.toml (the chart
test compares types).
*/}}
{{- define "inferaligner.tomlValue" -}}
{{- $key := index . 0 }}{{ $value := index . 1 }}
{{- $floatKeys := list "request_timeout_s" "gate_timeout_s" "drain_grace_s" "connect_timeout_s" "read_timeout_s" "offset" "alpha" "generated_scale" }}
{{- $json := toJson $value }}
{{- if and (kindIs "float64" $value) (has $key $floatKeys) (not (regexMatch "[.eE]" $json)) }}
{{- printf "%s.0" $json }}
{{- else }}
{{- $json }}
{{- end }}
{{- end }}

{{/*
A TOML table from a map: (list MAP PATH). Scalars and arrays first, then each sub-map as
[PATH.KEY]. Nulls are left out (an unset optional key, e.g. a policy's alpha). A table that
holds only sub-tables gets no header of its own.
*/}}
{{- define "inferaligner.tomlTable" -}}
{{- $table := index . 0 }}{{ $path := index . 1 }}
{{- range $key, $value := $table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{ include "inferaligner.tomlKey" $key }} = {{ include "inferaligner.tomlValue" (list $key $value) }}
{{- end }}
{{- end }}
{{- range $key, $value := $table }}
{{- if kindIs "map" $value }}
{{- $sub := include "inferaligner.tomlKey" $key }}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- $scalars := 0 }}
{{- range $v := $value }}{{ if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}{{ $scalars = add1 $scalars }}{{ end }}{{ end }}
{{- if or $scalars (empty $value) }}
{{ printf "\n[%s]" $sub }}
{{- end }}
{{- include "inferaligner.tomlTable" (list $value $sub) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "inferaligner.configToml" -}}
# Rendered by the inferaligner chart from values.config (keys as in config/default.toml).
{{- include "inferaligner.tomlTable" (list (include "inferaligner.configValues" . | fromJson) "") }}
{{- end }}
