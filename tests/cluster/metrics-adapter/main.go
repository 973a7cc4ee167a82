// external-metrics-adapter serves Kubernetes' external metrics API (external.metrics.k8s.io) from
// a Prometheus server, by prometheus-adapter's `externalRules` (name.as, resources.overrides
// namespace, metricsQuery with <<.Series>>, <<.LabelMatchers>> and <<.GroupBy>>), so the chart's
// HPA mode can be run on the test cluster with the rule its README documents.
//
// prometheus-adapter itself is not served by the Go module proxy this project builds from; this
// program is built on the same library it is (sigs.k8s.io/custom-metrics-apiserver: the API
// server, delegated authentication and authorization, discovery, OpenAPI) and implements only the
// part of its rule language that the chart's README uses. A rule using anything else is refused
// at start rather than answered differently from prometheus-adapter.
//
//	external-metrics-adapter --config rules.yaml --prometheus-url http://127.0.0.1:9090 \
//	  --secure-port 6443 --bind-address 10.234.0.1 --lister-kubeconfig admin.kubeconfig \
//	  --authentication-kubeconfig admin.kubeconfig --authorization-kubeconfig admin.kubeconfig
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/component-base/logs"
	"k8s.io/klog/v2"
	"k8s.io/metrics/pkg/apis/external_metrics"
	"sigs.k8s.io/yaml"

	basecmd "sigs.k8s.io/custom-metrics-apiserver/pkg/cmd"
	"sigs.k8s.io/custom-metrics-apiserver/pkg/provider"
)

// config is the part of prometheus-adapter's configuration file this adapter reads.
type config struct {
	ExternalRules []rule `json:"externalRules"`
}

type rule struct {
	SeriesQuery string `json:"seriesQuery"`
	Resources   struct {
		Overrides map[string]struct {
			Group    string `json:"group"`
			Resource string `json:"resource"`
		} `json:"overrides"`
		Template string `json:"template"`
	} `json:"resources"`
	Name struct {
		Matches string `json:"matches"`
		As      string `json:"as"`
	} `json:"name"`
	MetricsQuery string `json:"metricsQuery"`
}

// externalRule is one rule, checked and ready to answer.
type externalRule struct {
	metric         string
	series         string
	namespaceLabel string // "" when the metric is not namespaced
	query          *template.Template
}

var seriesName = regexp.MustCompile(`^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*$`)

func loadRules(path string) ([]externalRule, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var cfg config
	if err := yaml.UnmarshalStrict(raw, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(cfg.ExternalRules) == 0 {
		return nil, fmt.Errorf("%s: no externalRules", path)
	}
	var out []externalRule
	for i, r := range cfg.ExternalRules {
		where := fmt.Sprintf("%s: externalRules[%d]", path, i)
		m := seriesName.FindStringSubmatch(r.SeriesQuery)
		if m == nil {
			return nil, fmt.Errorf("%s: seriesQuery %q must be one series name with optional matchers", where, r.SeriesQuery)
		}
		if r.Name.As == "" || r.Name.Matches != "" {
			return nil, fmt.Errorf("%s: only name.as is supported (name.matches is not)", where)
		}
		if r.Resources.Template != "" {
			return nil, fmt.Errorf("%s: resources.template is not supported (use overrides)", where)
		}
		nsLabel := ""
		for label, target := range r.Resources.Overrides {
			if target.Resource != "namespace" || target.Group != "" {
				return nil, fmt.Errorf("%s: only an override to the namespace resource is supported, not %q", where, target.Resource)
			}
			nsLabel = label
		}
		tmpl, err := template.New(r.Name.As).Delims("<<", ">>").Option("missingkey=error").Parse(r.MetricsQuery)
		if err != nil {
			return nil, fmt.Errorf("%s: metricsQuery: %w", where, err)
		}
		out = append(out, externalRule{metric: r.Name.As, series: m[1], namespaceLabel: nsLabel, query: tmpl})
	}
	return out, nil
}

// matchers turns a label selector into PromQL label matchers, as prometheus-adapter does.
func matchers(selector labels.Selector) ([]string, error) {
	reqs, _ := selector.Requirements()
	var out []string
	for _, r := range reqs {
		values := r.Values().List()
		sort.Strings(values)
		switch r.Operator() {
		case selection.Equals, selection.DoubleEquals:
			out = append(out, fmt.Sprintf("%s=%s", r.Key(), strconv.Quote(values[0])))
		case selection.NotEquals:
			out = append(out, fmt.Sprintf("%s!=%s", r.Key(), strconv.Quote(values[0])))
		case selection.In, selection.NotIn:
			quoted := make([]string, len(values))
			for i, v := range values {
				quoted[i] = regexp.QuoteMeta(v)
			}
			op := "=~"
			if r.Operator() == selection.NotIn {
				op = "!~"
			}
			out = append(out, fmt.Sprintf("%s%s%s", r.Key(), op, strconv.Quote(strings.Join(quoted, "|"))))
		case selection.Exists:
			out = append(out, fmt.Sprintf("%s=~%s", r.Key(), strconv.Quote(".+")))
		case selection.DoesNotExist:
			out = append(out, fmt.Sprintf("%s=%s", r.Key(), strconv.Quote("")))
		default:
			return nil, fmt.Errorf("label selector operator %q is not supported", r.Operator())
		}
	}
	return out, nil
}

type prometheusProvider struct {
	base   *url.URL
	client *http.Client
	rules  map[string]externalRule
}

type queryResponse struct {
	Status string `json:"status"`
	Error  string `json:"error"`
	Data   struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	} `json:"data"`
}

func (p *prometheusProvider) query(ctx context.Context, promql string) (*queryResponse, error) {
	u := p.base.JoinPath("/api/v1/query")
	u.RawQuery = url.Values{"query": {promql}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out queryResponse
	if err := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 16<<20)).Decode(&out); err != nil {
		return nil, fmt.Errorf("prometheus answered %s with no JSON: %w", resp.Status, err)
	}
	if out.Status != "success" {
		return nil, fmt.Errorf("prometheus: %s", out.Error)
	}
	if out.Data.ResultType != "vector" {
		return nil, fmt.Errorf("prometheus returned a %s, not a vector, for %s", out.Data.ResultType, promql)
	}
	return &out, nil
}

func (p *prometheusProvider) GetExternalMetric(ctx context.Context, namespace string, selector labels.Selector,
	info provider.ExternalMetricInfo) (*external_metrics.ExternalMetricValueList, error) {
	r, ok := p.rules[info.Metric]
	if !ok {
		return nil, provider.NewMetricNotFoundError(external_metrics.Resource("externalmetrics"), info.Metric)
	}
	ms, err := matchers(selector)
	if err != nil {
		return nil, err
	}
	if r.namespaceLabel != "" && namespace != "" {
		ms = append([]string{fmt.Sprintf("%s=%s", r.namespaceLabel, strconv.Quote(namespace))}, ms...)
	}
	var promql strings.Builder
	if err := r.query.Execute(&promql, map[string]any{
		"Series": r.series, "LabelMatchers": strings.Join(ms, ","), "GroupBy": "", "GroupBySlice": []string{},
	}); err != nil {
		return nil, err
	}
	answer, err := p.query(ctx, promql.String())
	if err != nil {
		klog.Errorf("%s: %v", promql.String(), err)
		return nil, err
	}
	list := &external_metrics.ExternalMetricValueList{}
	for _, sample := range answer.Data.Result {
		text, _ := sample.Value[1].(string)
		value, err := strconv.ParseFloat(text, 64)
		if err != nil {
			return nil, fmt.Errorf("prometheus value %q: %w", text, err)
		}
		list.Items = append(list.Items, external_metrics.ExternalMetricValue{
			MetricName:   info.Metric,
			MetricLabels: sample.Metric,
			Timestamp:    metav1.Now(),
			Value:        *resource.NewMilliQuantity(int64(value*1000.0), resource.DecimalSI),
		})
	}
	klog.V(2).Infof("%s -> %d series", promql.String(), len(list.Items))
	if len(list.Items) == 0 {
		return nil, provider.NewMetricNotFoundError(external_metrics.Resource("externalmetrics"), info.Metric)
	}
	return list, nil
}

func (p *prometheusProvider) ListAllExternalMetrics() []provider.ExternalMetricInfo {
	out := make([]provider.ExternalMetricInfo, 0, len(p.rules))
	for name := range p.rules {
		out = append(out, provider.ExternalMetricInfo{Metric: name})
	}
	return out
}

func main() {
	logs.InitLogs()
	defer logs.FlushLogs()

	adapter := &basecmd.AdapterBase{Name: "external-metrics-adapter"}
	var configPath, prometheusURL string
	adapter.Flags().StringVar(&configPath, "config", "", "prometheus-adapter configuration file (externalRules)")
	adapter.Flags().StringVar(&prometheusURL, "prometheus-url", "", "Prometheus server URL")
	logs.AddFlags(adapter.Flags())
	if err := adapter.Flags().Parse(os.Args); err != nil {
		klog.Fatalf("flags: %v", err)
	}
	base, err := url.Parse(prometheusURL)
	if err != nil || base.Scheme == "" || base.Host == "" {
		klog.Fatalf("--prometheus-url %q: give the server's URL, e.g. http://127.0.0.1:9090", prometheusURL)
	}
	rules, err := loadRules(configPath)
	if err != nil {
		klog.Fatalf("--config: %v", err)
	}
	byName := map[string]externalRule{}
	for _, r := range rules {
		byName[r.metric] = r
	}
	adapter.WithExternalMetrics(&prometheusProvider{base: base, client: &http.Client{Timeout: 10 * time.Second}, rules: byName})
	klog.Infof("serving external metrics %v from %s", adapter.Flags().Args(), base)
	if err := adapter.Run(context.Background()); err != nil {
		klog.Fatalf("adapter: %v", err)
	}
}
