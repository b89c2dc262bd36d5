{{/* The topic and ACL data generated from schemas/ (deploy/helm/generate.py). */}}
{{- define "ragbus.data" -}}
{{- .Files.Get "files/topics.json" -}}
{{- end -}}

{{- define "ragbus.labels" -}}
app.kubernetes.io/part-of: ragbus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Strimzi binds KafkaTopic/KafkaUser resources to the Kafka cluster by this label. */}}
{{- define "ragbus.strimziLabels" -}}
{{ include "ragbus.labels" . }}
strimzi.io/cluster: {{ .Values.kafka.clusterName }}
{{- end -}}

{{- define "ragbus.selector" -}}
app.kubernetes.io/part-of: ragbus
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ragbus.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ragbus.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end -}}

{{- define "ragbus.prefix" -}}
{{- $p := .Values.topicPrefix -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$" $p) -}}
{{- fail (printf "topicPrefix %q: use lower-case letters, digits and '-' (it is part of Kubernetes names)" $p) -}}
{{- end -}}
{{- $p -}}
{{- end -}}

{{/* A tenant name after the chart's checks: valid for schemas/limits.py and as a Kubernetes name. */}}
{{- define "ragbus.tenant" -}}
{{- $t := toString . -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$" $t) -}}
{{- fail (printf "tenant %q: use lower-case letters, digits and '-' (tenant names become KafkaUser and KafkaTopic names)" $t) -}}
{{- end -}}
{{- if gt (len $t) 63 -}}
{{- fail (printf "tenant %q: at most 63 characters" $t) -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{- define "ragbus.bootstrap" -}}
{{- printf "%s-kafka-bootstrap:%v" .Values.kafka.clusterName .Values.kafka.listenerPort -}}
{{- end -}}

{{/* Settings every component shares (ConfigMap <release>-env), plus its Secrets. */}}
{{- define "ragbus.env" -}}
{{- $data := include "ragbus.data" .root | fromJson -}}
- name: RAGBUS_INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RAGBUS_OTEL_SERVICE_NAME
  value: {{ printf "ragbus-%s" .component | quote }}
- name: RAGBUS_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $data.componentsUser }}
      key: password
{{- end -}}

{{- define "ragbus.envFrom" -}}
- configMapRef:
    name: {{ include "ragbus.fullname" (dict "root" .root "component" "env") }}
{{- end -}}

{{- define "ragbus.kafkaCaVolume" -}}
- name: kafka-ca
  secret:
    secretName: {{ printf "%s-cluster-ca-cert" .Values.kafka.clusterName }}
    items:
      - key: ca.crt
        path: ca.crt
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "ragbus.kafkaCaMount" -}}
- name: kafka-ca
  mountPath: /etc/ragbus/kafka-ca
  readOnly: true
- name: home
  mountPath: /var/lib/ragbus
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "ragbus.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "ragbus.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}
