{{/*
Names, labels and the pieces several templates share.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "worker-pool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource-name prefix: RELEASE-worker-pool (or RELEASE when it already holds the chart name).
Truncated so that "-broker" / "-worker" still fit in 63 characters.
*/}}
{{- define "worker-pool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "worker-pool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "worker-pool.brokerName" -}}
{{- printf "%s-broker" (include "worker-pool.fullname" .) }}
{{- end }}

{{- define "worker-pool.workerName" -}}
{{- printf "%s-worker" (include "worker-pool.fullname" .) }}
{{- end }}

{{/* Tasks each worker runs at once (its --slots): worker.slots, or worker.concurrency, its old
name, when a values file still sets it. */}}
{{- define "worker-pool.workerSlots" -}}
{{- if hasKey .Values.worker "concurrency" }}{{ .Values.worker.concurrency }}{{ else }}{{ .Values.worker.slots }}{{ end }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "broker"). */}}
{{- define "worker-pool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "worker-pool.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Every resource's labels; call with (dict "ctx" $ "component" "broker").
`k8s://NAMESPACE/RELEASE` clients find the broker by app.kubernetes.io/instance=RELEASE and
app.kubernetes.io/component=broker.
*/}}
{{- define "worker-pool.labels" -}}
helm.sh/chart: {{ include "worker-pool.chart" .ctx }}
{{ include "worker-pool.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: runnable-k8s
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "worker-pool.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .Values.image.registry) $repo }}
{{- end }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "worker-pool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "worker-pool.brokerName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The address workers and the helm test Pod connect to. */}}
{{- define "worker-pool.brokerAddress" -}}
{{- if .Values.worker.brokerAddress }}
{{- .Values.worker.brokerAddress }}
{{- else }}
{{- printf "tcp://%s.%s.svc:%d" (include "worker-pool.brokerName" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/* The Pod's terminationGracePeriodSeconds: longer than the worker's own drain period. */}}
{{- define "worker-pool.workerTerminationGrace" -}}
{{- $drain := int .Values.worker.gracePeriodSeconds }}
{{- if kindIs "invalid" .Values.worker.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else }}
{{- $t := int .Values.worker.terminationGracePeriodSeconds }}
{{- if le $t $drain }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be greater than worker.gracePeriodSeconds (%d): otherwise Kubernetes kills a draining worker before it finishes its tasks" $t $drain) }}
{{- end }}
{{- $t }}
{{- end }}
{{- end }}

{{/*
Refuse configurations that would leave an open broker: without CURVE keys, anyone who reaches
the port runs code on the workers.
*/}}
{{- define "worker-pool.validate" -}}
{{- if .Values.curve.enabled }}
{{- if not .Values.curve.existingSecret }}
{{- fail "curve.existingSecret is required when curve.enabled is true: create the keys and their Secrets with `runnable-k8s keys ./keys --k8s-secret runnable-k8s-curve -n NAMESPACE`, then pass --set curve.existingSecret=runnable-k8s-curve (the prefix of the Secrets) (or set curve.enabled=false, see README)" }}
{{- end }}
{{- else }}
{{- /* A NetworkPolicy (and a private-network promise) covers only Pod-to-Pod traffic inside the
cluster: a port opened on the node, a NodePort or a LoadBalancer is reached from outside it. */}}
{{- if .Values.broker.hostNetwork }}
{{- fail "curve.enabled=false is refused with broker.hostNetwork=true: the broker's plaintext port is then open on the node itself, where no NetworkPolicy applies, and anyone who reaches it runs code on the workers. Turn CURVE keys on (runnable-k8s keys ./keys --k8s-secret runnable-k8s-curve; --set curve.enabled=true,curve.existingSecret=runnable-k8s-curve) or set broker.hostNetwork=false" }}
{{- end }}
{{- if ne .Values.service.type "ClusterIP" }}
{{- fail (printf "curve.enabled=false is refused with service.type=%s: a %s Service opens the broker's plaintext port outside the cluster, where no NetworkPolicy applies, and anyone who reaches it runs code on the workers. Turn CURVE keys on (runnable-k8s keys ./keys --k8s-secret runnable-k8s-curve; --set curve.enabled=true,curve.existingSecret=runnable-k8s-curve) or set service.type=ClusterIP (laptops can still use pool=\"k8s://NAMESPACE/RELEASE\")" .Values.service.type .Values.service.type) }}
{{- end }}
{{- /* The NetworkPolicy is on by default, so it cannot be the deliberate word a plaintext broker
needs: only curve.insecureAcknowledged is. */}}
{{- if not .Values.curve.insecureAcknowledged }}
{{- fail "curve.enabled=false runs the broker with --insecure: every Pod that reaches its port runs code on the workers (with networkPolicy.enabled, only Pods labelled as this release's clients or workers, and only if your CNI enforces NetworkPolicies). Turn CURVE keys on (runnable-k8s keys ./keys --k8s-secret runnable-k8s-curve; --set curve.enabled=true,curve.existingSecret=runnable-k8s-curve), or set curve.insecureAcknowledged=true to accept that" }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}

{{/*
CURVE keys, one Secret per role, made by `runnable-k8s keys DIR --k8s-secret PREFIX` with
PREFIX = curve.existingSecret. Call with (dict "ctx" $ "role" "broker"|"worker"|"client").
The broker gets its pair and the two allow-lists (PREFIX-clients, PREFIX-workers) at separate
paths: Secret volumes are read-only, so one cannot be mounted inside another. Workers get only
PREFIX-worker (their pair + broker.key), the helm test Pod only its client's pair + broker.key.
*/}}
{{- define "worker-pool.curveSecrets" -}}
{{- $prefix := .ctx.Values.curve.existingSecret }}
{{- if eq .role "broker" }}
{{- list (list "curve-keys" (printf "%s-broker" $prefix) "/etc/runnable-k8s/keys") (list "curve-client-keys" (printf "%s-clients" $prefix) "/etc/runnable-k8s/client-keys") (list "curve-worker-keys" (printf "%s-workers" $prefix) "/etc/runnable-k8s/worker-keys") | toJson }}
{{- else if eq .role "worker" }}
{{- list (list "curve-keys" (printf "%s-worker" $prefix) "/etc/runnable-k8s/keys") | toJson }}
{{- else }}
{{- list (list "curve-keys" (printf "%s-client-%s" $prefix .ctx.Values.curve.testClient) "/etc/runnable-k8s/keys") | toJson }}
{{- end }}
{{- end }}

{{/* The Secret volumes of a role's CURVE keys, 0440: readable by the Pod's fsGroup, no one else. */}}
{{- define "worker-pool.curveVolumes" -}}
{{- range (include "worker-pool.curveSecrets" . | fromJsonArray) }}
- name: {{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Where a role's containers mount those volumes. readOnly, as the kubelet mounts every Secret
volume anyway: the key loaders accept the volume's root-owned 3777 folder only on a read-only
mount (a folder others could write is refused: whoever writes it can swap the keys). */}}
{{- define "worker-pool.curveMounts" -}}
{{- range (include "worker-pool.curveSecrets" . | fromJsonArray) }}
- name: {{ index . 0 }}
  mountPath: {{ index . 2 }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The labels that let a client Pod through the NetworkPolicy: one the chart makes per release,
FULLNAME-client: "true" (at most 56 + 7 = 63 characters, a valid label name), so that a label
meant for one pool opens no other; or networkPolicy.clientPodLabels, which replaces it.
*/}}
{{- define "worker-pool.clientLabelKey" -}}
{{- printf "%s-client" (include "worker-pool.fullname" .) }}
{{- end }}

{{- define "worker-pool.clientPodLabels" -}}
{{- toYaml (.Values.networkPolicy.clientPodLabels | default (dict (include "worker-pool.clientLabelKey" .) "true")) }}
{{- end }}

{{/* Who may scrape the metrics port: metrics.from and networkPolicy.metricsFrom together. */}}
{{- define "worker-pool.metricsFrom" -}}
{{- $from := concat (.Values.metrics.from | default list) (.Values.networkPolicy.metricsFrom | default list) }}
{{- if $from }}
{{- toYaml $from }}
{{- end }}
{{- end }}
