{{/* Names and labels. */}}
{{- define "kleidi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kleidi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kleidi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kleidi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kleidi.labels" -}}
{{ include "kleidi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kleidi.serviceAccountName" -}}
{{- default (include "kleidi.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* What `helm uninstall` must leave: the DaemonSet and everything its pods mount (docs/helm.md, uninstall). */}}
{{- define "kleidi.keep" -}}
helm.sh/resource-policy: keep
{{- end -}}

{{/*
The plugin container. roles/kleidi_plugin/filter_plugins/kleidi_pod.py makes the same container for the
static pod from the same values; tests/test_helm_chart.py compares the two.
*/}}
{{- define "kleidi.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- if .Values.image.digest -}}{{ printf "%s@%s" $ref .Values.image.digest }}{{- else -}}{{ $ref }}{{- end -}}
{{- end -}}

{{- define "kleidi.socketPath" -}}
{{- trimPrefix "unix://" .Values.config.listen -}}
{{- end -}}

{{- define "kleidi.socketDir" -}}
{{- dir (include "kleidi.socketPath" .) -}}
{{- end -}}

{{/* kleidi.yaml: the values' config with only the section its provider names. */}}
{{- define "kleidi.pluginConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- range list "pkcs11" "vault" "remote" -}}
{{- if ne . $.Values.config.provider -}}{{- $_ := unset $config . -}}{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{- define "kleidi.usesServiceAccountToken" -}}
{{- and (eq .Values.config.provider "vault") (has .Values.config.vault.auth.method (list "kubernetes" "jwt")) -}}
{{- end -}}

{{/*
Probes go to the plugin's HTTP endpoint. With hostNetwork a probe without a host goes to the node's address,
which a loopback listener never hears, so the listener's host is named; kleidi listens on loopback when the
host is empty. A wildcard listener answers on the node address.
*/}}
{{- define "kleidi.probes" -}}
{{- with .Values.config.metrics_listen }}
{{- $port := regexFind "[0-9]+$" . | atoi }}
{{- $host := regexReplaceAll ":[0-9]+$" . "" | trimPrefix "[" | trimSuffix "]" | default "127.0.0.1" }}
{{- $named := and $.Values.hostNetwork (not (has $host (list "0.0.0.0" "::"))) }}
{{- range $kind, $path := dict "livenessProbe" "/livez" "readinessProbe" "/readyz" }}
{{ $kind }}:
  httpGet:
    path: {{ $path }}
    port: {{ $port }}
    scheme: HTTP
    {{- if $named }}
    host: {{ $host | quote }}
    {{- end }}
  {{- toYaml (get $.Values.probes (trimSuffix "Probe" $kind)) | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "kleidi.container" -}}
name: kleidi
image: {{ include "kleidi.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command: [kleidi, serve, --config, /etc/kleidi-config/kleidi.yaml]
{{- with .Values.env }}
env:
  {{- range $name, $value := . }}
  - name: {{ $name }}
    value: {{ $value | toString | quote }}
  {{- end }}
{{- end }}
volumeMounts:
  - name: config
    mountPath: /etc/kleidi-config
    readOnly: true
  - name: credentials
    mountPath: {{ .Values.configDir }}
    readOnly: true
  - name: socket
    mountPath: {{ include "kleidi.socketDir" . }}
  {{- range .Values.hostVolumes }}
  - name: {{ .name }}
    mountPath: {{ .path }}
    {{- if .readOnly }}
    readOnly: true
    {{- end }}
  {{- end }}
{{- include "kleidi.probes" . }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{/* Scheduling shared by the plugin's pods and the test pod: control-plane nodes only. */}}
{{- define "kleidi.placement" -}}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Values the schema cannot express, refused with a message that says what to change. */}}
{{- define "kleidi.validate" -}}
{{- $reserved := list "config" "credentials" "socket" "chart-scripts" "static-pods" -}}
{{- range .Values.hostVolumes }}
{{- if has .name $reserved }}
{{- fail (printf "hostVolumes: the name %q is the chart's own; pick another" .name) }}
{{- end }}
{{- end }}
{{- if and (not .Values.hostNetwork) .Values.config.metrics_listen (not (regexMatch "^(0\\.0\\.0\\.0|\\[::\\]):[0-9]+$" .Values.config.metrics_listen)) }}
{{- fail "hostNetwork false: the kubelet probes the pod's address, so set config.metrics_listen to 0.0.0.0:<port> or [::]:<port>" }}
{{- end }}
{{- if .Values.softhsm.initToken }}
{{- if or (ne .Values.config.provider "pkcs11") (ne .Values.config.pkcs11.mechanism "aes-gcm") }}
{{- fail "softhsm.initToken creates a SoftHSM2 AES-GCM KEK: it needs config.provider pkcs11 and mechanism aes-gcm" }}
{{- end }}
{{- if not .Values.config.pkcs11.pin_file }}
{{- fail "softhsm.initToken reads the user PIN from config.pkcs11.pin_file; set it" }}
{{- end }}
{{- $found := false }}
{{- range .Values.hostVolumes }}
{{- if and (eq .path $.Values.softhsm.tokenDir) (not .readOnly) }}{{ $found = true }}{{ end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "softhsm.initToken: add a writable hostVolumes entry for the token directory %s (the plugin needs it too)" .Values.softhsm.tokenDir) }}
{{- end }}
{{- end }}
{{- end -}}
