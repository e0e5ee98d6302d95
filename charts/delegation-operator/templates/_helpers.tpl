{{/* The chart name. */}}
{{- define "delegation-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's name for its objects: the release name when it already contains the chart's. */}}
{{- define "delegation-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object the chart renders. */}}
{{- define "delegation-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "delegation-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator Pods. */}}
{{- define "delegation-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "delegation-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels that select the verification server's Pods: a name of their own, so that no selector of
     the controller's (the Deployment's is immutable) ever matches them. */}}
{{- define "delegation-operator.verifierSelectorLabels" -}}
app.kubernetes.io/name: {{ include "delegation-operator.name" . }}-verifier
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object of the verification server. */}}
{{- define "delegation-operator.verifierLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "delegation-operator.verifierSelectorLabels" . }}
app.kubernetes.io/component: verifier
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The verification server's name (Deployment, ServiceAccount, its roles). */}}
{{- define "delegation-operator.verifierName" -}}
{{- printf "%s-verifier" (include "delegation-operator.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{/* Where the verification server finds the mounted serving certificate. */}}
{{- define "delegation-operator.tlsMountPath" -}}
/etc/delegation-operator/tls
{{- end -}}

{{/* Arguments both processes take: the limits on apiserver reviews their callers cause. */}}
{{- define "delegation-operator.callerLimitArgs" -}}
- --caller-rate={{ .Values.callerLimits.rate }}
- --caller-burst={{ .Values.callerLimits.burst }}
- --review-concurrency={{ .Values.callerLimits.reviewConcurrency }}
- --review-rate={{ .Values.callerLimits.reviewRate }}
- --review-cache-ttl={{ .Values.callerLimits.cacheTTL }}
- --review-negative-cache-ttl={{ .Values.callerLimits.negativeCacheTTL }}
{{- end -}}

{{/* Egress of both NetworkPolicies: the value, else all (the apiserver's address differs per
     cluster). */}}
{{- define "delegation-operator.egress" -}}
{{- with .Values.networkPolicy.egress -}}
{{- toYaml . }}
{{- else -}}
- {}
{{- end -}}
{{- end -}}

{{/* The issuer URL: the value, or the chart's Service. */}}
{{- define "delegation-operator.issuer" -}}
{{- .Values.issuer | default (printf "https://%s.%s.svc" (include "delegation-operator.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{/* The image reference. */}}
{{- define "delegation-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Host names of the serving certificate: the issuer's host, the Service's names, extras. */}}
{{- define "delegation-operator.dnsNames" -}}
{{- $fullname := include "delegation-operator.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list (urlParse (include "delegation-operator.issuer" .)).hostname $fullname (printf "%s.%s" $fullname $ns) (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.cluster.local" $fullname $ns) -}}
{{- range .Values.tls.extraDNSNames }}{{ $names = append $names . }}{{ end -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{/* Metadata of the cluster-wide API objects (CRDs, admission policies): the chart's labels and,
     with keep, the annotation that makes `helm uninstall` leave them. */}}
{{- define "delegation-operator.apiMetadata" -}}
labels:
  {{- include "delegation-operator.labels" .context | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  app.kubernetes.io/part-of: delegation-operator
{{- if .keep }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end -}}

{{/* Refuses combinations of values the schema cannot express. */}}
{{- define "delegation-operator.checks" -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicas) 1) -}}
{{- fail "leaderElection.enabled=false needs replicas: 1 (two writing replicas would lose revocations)" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if not (hasPrefix "https://" (include "delegation-operator.issuer" .)) -}}
{{- fail "issuer must be an https:// URL" -}}
{{- end -}}
{{- end -}}
