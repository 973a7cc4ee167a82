{{/*
Autoscaling: which engine sets the worker Deployment's replicas, and the numbers they all share.

autoscaling.enabled turns autoscaling on; autoscaling.mode picks who does it:
  builtin  the broker's own autoscaler patches the Deployment's scale subresource (needs a Role);
  keda     a KEDA ScaledObject (scale to zero included) reads the broker's /scaling endpoint
           (metrics-api scaler) or Prometheus (prometheus scaler);
  hpa      an autoscaling/v2 HorizontalPodAutoscaler on a metric a metrics adapter serves.
Exactly one controller sets the replicas: in keda and hpa modes the broker only computes the
signal (its --autoscale-* flags without --autoscale-deployment) and gets no Role.
*/}}

{{/* The engine in force: "builtin", "keda", "hpa", or "" when autoscaling is off. */}}
{{- define "worker-pool.autoscalingMode" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.mode | default "builtin" }}{{ end }}
{{- end }}

{{/*
Calls in flight (queued + running) per worker that the load is divided by: the policy's
target_per_worker (pool/scaling/policy.py), min(targetInFlightPerWorker, worker slots) x
targetTasksPerSlot. KEDA's targetValue/threshold and the HPA's averageValue are this number, so
every engine asks for ceil(demand / target) workers, as the builtin autoscaler does.
*/}}
{{- define "worker-pool.autoscalingTarget" -}}
{{- $slots := int (include "worker-pool.workerSlots" .) }}
{{- $calls := min (int .Values.autoscaling.targetInFlightPerWorker) $slots }}
{{- mulf $calls (float64 .Values.autoscaling.targetTasksPerSlot) }}
{{- end }}

{{/* The same as a Kubernetes quantity: "64", or milli-units ("51200m") for a fraction. */}}
{{- define "worker-pool.autoscalingTargetQuantity" -}}
{{- $milli := int64 (round (mulf (float64 (include "worker-pool.autoscalingTarget" .)) 1000) 0) }}
{{- if eq (mod $milli 1000) 0 }}{{ div $milli 1000 }}{{ else }}{{ $milli }}m{{ end }}
{{- end }}

{{/* The broker's JSON scaling endpoint, through its Service's metrics port. */}}
{{- define "worker-pool.scalingUrl" -}}
{{- printf "http://%s.%s.svc:%d/scaling" (include "worker-pool.brokerName" .) .Release.Namespace (int .Values.metrics.port) }}
{{- end }}

{{/*
The HPA behavior of both keda and hpa modes: up at once (one step to any count, as the builtin
autoscaler does), down only to the highest recommendation of stabilizationWindowSeconds;
autoscaling.behavior is merged over it.
*/}}
{{- define "worker-pool.autoscalingBehavior" -}}
{{- $a := .Values.autoscaling }}
{{- $chart := dict
    "scaleUp" (dict "stabilizationWindowSeconds" 0 "selectPolicy" "Max"
                    "policies" (list (dict "type" "Pods" "value" (int $a.maxReplicas) "periodSeconds" 15)))
    "scaleDown" (dict "stabilizationWindowSeconds" (int $a.stabilizationWindowSeconds)) }}
{{- toYaml (mergeOverwrite $chart (deepCopy ($a.behavior | default dict))) }}
{{- end }}

{{/* Refuse combinations that would leave the workers unscaled, scaled twice, or unscalable. */}}
{{- define "worker-pool.autoscalingValidate" -}}
{{- $a := .Values.autoscaling }}
{{- $mode := $a.mode | default "builtin" }}
{{- if and (ne $mode "builtin") (not $a.enabled) }}
{{- fail (printf "autoscaling.mode=%s takes effect only with autoscaling.enabled=true: set both (--set autoscaling.enabled=true,autoscaling.mode=%s), or drop autoscaling.mode" $mode $mode) }}
{{- end }}
{{- if and $a.enabled (ne $mode "builtin") }}
{{- if not .Values.metrics.enabled }}
{{- fail (printf "autoscaling.mode=%s scales on the load the broker publishes on its metrics port (/scaling, runnable_k8s_scaling_demand): set metrics.enabled=true" $mode) }}
{{- end }}
{{- if gt (int $a.stabilizationWindowSeconds) 3600 }}
{{- fail (printf "autoscaling.stabilizationWindowSeconds (%d) is above 3600, the most a HorizontalPodAutoscaler accepts (autoscaling.mode=%s): lower it" (int $a.stabilizationWindowSeconds) $mode) }}
{{- end }}
{{- end }}
{{- if and $a.enabled (eq $mode "hpa") (lt (int $a.minReplicas) 1) }}
{{- fail "autoscaling.mode=hpa cannot scale to zero (a HorizontalPodAutoscaler's minReplicas 0 needs the alpha HPAScaleToZero feature gate): set autoscaling.minReplicas to 1 or more, or use autoscaling.mode=keda, which scales to zero" }}
{{- end }}
{{- if and $a.enabled (eq $mode "keda") }}
{{- if and (eq $a.keda.trigger "prometheus") (not $a.keda.prometheus.serverAddress) }}
{{- fail "autoscaling.keda.trigger=prometheus needs autoscaling.keda.prometheus.serverAddress (e.g. http://prometheus-operated.monitoring.svc:9090), or use the default trigger metrics-api, which asks the broker itself" }}
{{- end }}
{{- if and (eq (int $a.minReplicas) 0) (ge (float64 $a.keda.pollingInterval) (float64 .Values.broker.queueTimeout)) }}
{{- fail (printf "autoscaling.keda.pollingInterval (%v s) must be shorter than broker.queueTimeout (%v s) with autoscaling.minReplicas 0: a call that arrives while no worker runs waits in the queue for KEDA's next poll and a Pod's start. Lower the interval or raise broker.queueTimeout" $a.keda.pollingInterval .Values.broker.queueTimeout) }}
{{- end }}
{{- end }}
{{- end }}
