{{/* Name of the release's objects. */}}
{{- define "smartgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "smartgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "smartgate.labels" -}}
{{ include "smartgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "smartgate.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (required "image.tag or image.digest is required" .tag) -}}
{{- end -}}
{{- end -}}

{{/* server.workers from resources.limits.cpu, rounded up, at least 1: "500m" → 1,
     "1500m" → 2, "2" → 2. */}}
{{- define "smartgate.workers" -}}
{{- $cpu := toString (default "1" .Values.resources.limits.cpu) -}}
{{- $n := 1 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $n = div (add (trimSuffix "m" $cpu | atoi) 999) 1000 -}}
{{- else -}}
{{- $n = ceil (float64 $cpu) | int -}}
{{- end -}}
{{- max 1 $n -}}
{{- end -}}

{{/* The upstream smartgate forwards to. */}}
{{- define "smartgate.upstreamUrl" -}}
{{- if eq .Values.mode "sidecar" -}}
{{- printf "http://127.0.0.1:%v/fhir" .Values.fhir.port -}}
{{- else -}}
{{- required "upstreamUrl is required in standalone mode" .Values.upstreamUrl -}}
{{- end -}}
{{- end -}}
